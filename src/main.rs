fn main() -> std::process::ExitCode {
    colony::cli::main()
}

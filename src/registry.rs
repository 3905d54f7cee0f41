//! The modules this binary can run. The only place that names them all.

use kernel::module::ModuleSpec;

pub const ALL: [ModuleSpec; 5] = [
    catalog::SPEC,
    cart::SPEC,
    checkout::SPEC,
    notification::SPEC,
    delivery::SPEC,
];

pub fn names() -> Vec<&'static str> {
    ALL.iter().map(|m| m.name).collect()
}

pub fn is_module(name: &str) -> bool {
    ALL.iter().any(|m| m.name == name)
}

/// The specs named in `selection` (comma-separated; empty or `all` means every module).
pub fn select(selection: Option<&str>) -> anyhow::Result<Vec<ModuleSpec>> {
    let Some(selection) = selection
        .map(str::trim)
        .filter(|s| !s.is_empty() && *s != "all")
    else {
        return Ok(ALL.to_vec());
    };
    let mut chosen = Vec::new();
    for name in selection
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
    {
        let spec = ALL.iter().find(|m| m.name == name).ok_or_else(|| {
            anyhow::anyhow!("no module {name:?}; modules are {}", names().join(", "))
        })?;
        if !chosen.iter().any(|c: &ModuleSpec| c.name == name) {
            chosen.push(*spec);
        }
    }
    Ok(chosen)
}

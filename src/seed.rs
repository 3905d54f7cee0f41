//! `colony seed`: fills a fresh instance with a small, realistic catalog and prints
//! bearer tokens for a seller, an admin and two customers, as shell exports.

use std::time::Duration;

use anyhow::Context;
use catalog::{CatalogError, CreateProduct};
use contracts::Money;
use kernel::auth::{Authenticator, Role};
use kernel::outbox::Publisher;
use uuid::Uuid;

use crate::runtime::open_database;
use crate::settings::Settings;

const SELLER: &str = "seller-demo";

/// (sku, name, description, price in cents, units on hand)
const PRODUCTS: &[(&str, &str, &str, i64, i64)] = &[
    (
        "TEA-SENCHA-100",
        "Sencha, 100 g",
        "Steamed Japanese green tea, first flush.",
        1250,
        40,
    ),
    (
        "TEA-ASSAM-250",
        "Assam breakfast, 250 g",
        "Malty black tea, strong enough for milk.",
        1490,
        60,
    ),
    (
        "TEA-ROOIBOS-100",
        "Rooibos, 100 g",
        "Caffeine-free red bush from the Cederberg.",
        790,
        35,
    ),
    (
        "TEA-OOLONG-50",
        "Tieguanyin oolong, 50 g",
        "Lightly oxidised, floral, many infusions.",
        1890,
        12,
    ),
    (
        "MUG-STONE-350",
        "Stoneware mug, 350 ml",
        "Hand-glazed, dishwasher safe.",
        1600,
        25,
    ),
    (
        "POT-CAST-800",
        "Cast-iron teapot, 0.8 l",
        "Enamelled inside, with a steel infuser.",
        5900,
        8,
    ),
    (
        "KETTLE-GOOSE-1",
        "Gooseneck kettle, 1 l",
        "Temperature control from 40 to 100 °C.",
        7900,
        5,
    ),
    (
        "INFUSER-STEEL",
        "Steel infuser basket",
        "Fits most mugs and pots.",
        890,
        80,
    ),
    (
        "SCALE-01G",
        "Tea scale, 0.1 g",
        "Weighs leaves and water alike.",
        2490,
        15,
    ),
    (
        "CADDY-TIN-200",
        "Tea caddy, 200 g",
        "Airtight tin with an inner lid.",
        1190,
        30,
    ),
    (
        "GIFT-SAMPLER",
        "Sampler gift box",
        "Six teas, 20 g each, in a wooden box.",
        3400,
        10,
    ),
    (
        "CUP-GLASS-2",
        "Double-wall glasses, pair",
        "Borosilicate, keeps hands cool.",
        2200,
        20,
    ),
];

pub fn run(settings: &Settings) -> anyhow::Result<()> {
    let s = settings.clone();
    let (listed, skipped) = actix_web::rt::System::new().block_on(async move {
        let db =
            tokio::task::spawn_blocking(move || open_database(&s, &catalog::SPEC, true)).await??;
        let (mut listed, mut skipped) = (0, 0);
        for (sku, name, description, price, stock) in PRODUCTS {
            let product = CreateProduct {
                sku: (*sku).into(),
                name: (*name).into(),
                description: Some((*description).into()),
                price: Money::new(*price, "EUR"),
                stock: *stock,
            };
            let publisher = Publisher::new(catalog::MODULE, Uuid::now_v7(), None);
            match catalog::list_product(&db, SELLER, product, publisher).await {
                Ok(_) => listed += 1,
                Err(CatalogError::DuplicateSku(_)) => skipped += 1,
                Err(e) => {
                    return Err(anyhow::Error::from(e)).with_context(|| format!("listing {sku}"));
                }
            }
        }
        Ok::<_, anyhow::Error>((listed, skipped))
    })?;
    let auth = Authenticator::new(&settings.auth.jwt_secret);
    let day = Duration::from_secs(24 * 3600);
    println!("export SELLER={}", auth.issue(SELLER, Role::Seller, day));
    println!(
        "export ADMIN={}",
        auth.issue("admin-demo", Role::Admin, day)
    );
    println!("export ALICE={}", auth.issue("alice", Role::Customer, day));
    println!("export BOB={}", auth.issue("bob", Role::Customer, day));
    eprintln!(
        "seeded {listed} products ({skipped} were there already) for {SELLER}; tokens above are valid for 24 h \
         (eval \"$(colony seed)\" puts them in your shell)"
    );
    Ok(())
}

//! Cart routes: `/api/v1/cart` (the caller's own cart).

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, web};
use contracts::Money;
use contracts::cart::{CartLine, CartSnapshot};
use kernel::auth::{Caller, Role};
use kernel::db::DbError;
use kernel::error::resource;
use kernel::{AnyConnection, Db, Problem};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::MODULE;
use crate::domain::{self, CartRule, PricedLine};
use crate::store;

pub fn routes(cfg: &mut web::ServiceConfig, db: Db) {
    let data = web::Data::new(db);
    cfg.service(
        resource("/api/v1/cart")
            .app_data(data.clone())
            .route(web::get().to(get_cart)),
    )
    .service(
        resource("/api/v1/cart/items/{product_id}")
            .app_data(data)
            .route(web::put().to(set_item))
            .route(web::delete().to(remove_item)),
    );
}

#[derive(Debug, thiserror::Error)]
pub enum CartError {
    #[error(transparent)]
    Rule(#[from] CartRule),
    #[error("no product {0}")]
    UnknownProduct(String),
    #[error("product {0} is no longer sold")]
    Unavailable(String),
    #[error("{0}")]
    Denied(Problem),
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<diesel::result::Error> for CartError {
    fn from(e: diesel::result::Error) -> Self {
        Self::Db(DbError::Query(e))
    }
}

impl From<Problem> for CartError {
    fn from(p: Problem) -> Self {
        Self::Denied(p)
    }
}

impl CartError {
    fn problem(&self) -> Problem {
        let detail = self.to_string();
        match self {
            Self::Rule(CartRule::QuantityOutOfRange) => {
                Problem::unprocessable("validation_failed", detail)
            }
            Self::Rule(CartRule::CurrencyMismatch { .. }) => {
                Problem::unprocessable("currency_mismatch", detail)
            }
            Self::Rule(CartRule::Overflow) => Problem::unprocessable("validation_failed", detail),
            Self::UnknownProduct(_) => Problem::not_found("product_not_found", detail),
            Self::Unavailable(_) => Problem::unprocessable("product_unavailable", detail),
            Self::Denied(p) => p.clone(),
            Self::Db(e) => e.problem(MODULE),
        }
    }
}

impl actix_web::ResponseError for CartError {
    fn status_code(&self) -> StatusCode {
        self.problem().status_code()
    }

    fn error_response(&self) -> HttpResponse {
        self.problem().to_response()
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CartItemView {
    pub product_id: String,
    pub name: String,
    pub quantity: i64,
    #[schema(value_type = kernel::openapi::MoneySchema)]
    pub unit_price: Money,
    #[schema(value_type = kernel::openapi::MoneySchema)]
    pub line_total: Money,
    /// False once the product is delisted: the cart cannot be ordered until it goes.
    pub available: bool,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CartView {
    pub items: Vec<CartItemView>,
    /// `null` for an empty cart.
    #[schema(value_type = Option<kernel::openapi::MoneySchema>)]
    pub total: Option<Money>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetQuantity {
    /// 0 removes the line.
    pub quantity: i64,
}

/// The customer's cart as it stands, priced from the read model.
pub fn snapshot(conn: &mut AnyConnection, customer_id: &str) -> Result<CartSnapshot, CartError> {
    let rows = store::lines(conn, customer_id)?;
    let mut priced = Vec::with_capacity(rows.len());
    let mut lines = Vec::with_capacity(rows.len());
    for (quantity, product) in rows {
        let line = PricedLine {
            quantity,
            unit_price: Money::new(product.price_minor, product.currency.clone()),
        };
        lines.push(CartLine {
            product_id: Uuid::parse_str(&product.product_id).unwrap_or_default(),
            name: product.name,
            quantity,
            line_total: line.total()?,
            unit_price: line.unit_price.clone(),
            available: product.listed,
        });
        priced.push(line);
    }
    Ok(CartSnapshot {
        customer_id: customer_id.to_string(),
        total: domain::total(&priced)?,
        lines,
    })
}

fn view(snapshot: CartSnapshot) -> CartView {
    CartView {
        items: snapshot
            .lines
            .into_iter()
            .map(|l| CartItemView {
                product_id: l.product_id.to_string(),
                name: l.name,
                quantity: l.quantity,
                unit_price: l.unit_price,
                line_total: l.line_total,
                available: l.available,
            })
            .collect(),
        total: snapshot.total,
    }
}

fn customer(caller: &Caller) -> Result<String, CartError> {
    caller.require(&[Role::Customer])?;
    Ok(caller.subject.clone())
}

/// A product id from the path: anything but a UUID names no product.
fn product_id(raw: &str) -> Result<String, CartError> {
    Uuid::parse_str(raw)
        .map(|u| u.to_string())
        .map_err(|_| CartError::UnknownProduct(raw.to_string()))
}

#[utoipa::path(
    get, path = "/api/v1/cart", tag = "cart",
    responses((status = 200, body = CartView), (status = 401, body = Problem), (status = 403, body = Problem)),
    security(("bearer" = []))
)]
pub async fn get_cart(db: web::Data<Db>, caller: Caller) -> Result<web::Json<CartView>, CartError> {
    let customer = customer(&caller)?;
    let cart = db.read(move |conn| snapshot(conn, &customer)).await?;
    Ok(web::Json(view(cart)))
}

#[utoipa::path(
    put, path = "/api/v1/cart/items/{product_id}", tag = "cart",
    params(("product_id" = String, Path, description = "catalog product id")),
    request_body = SetQuantity,
    responses(
        (status = 200, body = CartView), (status = 404, description = "unknown product", body = Problem),
        (status = 422, description = "delisted product, bad quantity or another currency", body = Problem)
    ),
    security(("bearer" = []))
)]
pub async fn set_item(
    db: web::Data<Db>,
    caller: Caller,
    path: web::Path<String>,
    body: web::Json<SetQuantity>,
) -> Result<web::Json<CartView>, CartError> {
    let customer = customer(&caller)?;
    let product_id = product_id(&path)?;
    let quantity = domain::parse_quantity(body.quantity)?;
    let cart = db
        .write(move |conn| {
            if quantity == 0 {
                store::remove_line(conn, &customer, &product_id)?;
                return snapshot(conn, &customer);
            }
            let product = store::find_product(conn, &product_id)?
                .ok_or_else(|| CartError::UnknownProduct(product_id.clone()))?;
            if !product.listed {
                return Err(CartError::Unavailable(product_id));
            }
            let others = store::lines(conn, &customer)?;
            let cart_currency = others
                .iter()
                .find(|(_, p)| p.product_id != product_id)
                .map(|(_, p)| p.currency.as_str());
            domain::check_currency(cart_currency, &product.currency)?;
            store::set_quantity(conn, &customer, &product_id, quantity, kernel::time::now())?;
            snapshot(conn, &customer)
        })
        .await?;
    Ok(web::Json(view(cart)))
}

#[utoipa::path(
    delete, path = "/api/v1/cart/items/{product_id}", tag = "cart",
    params(("product_id" = String, Path, description = "catalog product id")),
    responses((status = 200, body = CartView), (status = 401, body = Problem)),
    security(("bearer" = []))
)]
pub async fn remove_item(
    db: web::Data<Db>,
    caller: Caller,
    path: web::Path<String>,
) -> Result<web::Json<CartView>, CartError> {
    let customer = customer(&caller)?;
    let product_id = product_id(&path)?;
    let cart = db
        .write(move |conn| {
            store::remove_line(conn, &customer, &product_id)?;
            snapshot(conn, &customer)
        })
        .await?;
    Ok(web::Json(view(cart)))
}

//! Catalog routes: `/api/v1/catalog/products`.

use std::sync::Arc;

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, web};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use contracts::Money;
use contracts::catalog::{
    PriceChanged, ProductDelisted, ProductDetailsChanged, ProductListed, StockChanged,
};
use kernel::auth::{Caller, Role};
use kernel::context::RequestContext;
use kernel::db::DbError;
use kernel::lookup::Lookups;
use kernel::metrics::Metrics;
use kernel::outbox::Publisher;
use kernel::{AnyConnection, Db, Problem};
use serde::{Deserialize, Deserializer, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::MODULE;
use crate::domain::{self, Invalid, ProductId, Sku, Stock, StockError};
use crate::store::{self, ProductChanges, ProductRow};

const DEFAULT_PAGE: i64 = 20;
const MAX_PAGE: i64 = 100;

/// Reads of single products by id, made together under load.
pub type ProductLookups = Lookups<String, ProductRow>;

/// Rounds of product reads at once, each with a blocking thread and a connection
/// (fewer with a small pool: `Lookups::new`).
const READ_LANES: usize = 2;

pub fn product_lookups(db: Db, metrics: Arc<Metrics>) -> ProductLookups {
    Lookups::new(db, "products", metrics, READ_LANES, store::find_many)
}

pub fn routes(cfg: &mut web::ServiceConfig, db: Db, products: ProductLookups) {
    cfg.service(
        web::scope("/api/v1/catalog")
            .app_data(web::Data::new(db))
            .app_data(web::Data::new(products))
            .service(
                kernel::error::resource("/products")
                    .route(web::get().to(list_products))
                    .route(web::post().to(create_product)),
            )
            .service(
                kernel::error::resource("/products/{id}")
                    .route(web::get().to(get_product))
                    .route(web::patch().to(update_product))
                    .route(web::delete().to(delist_product)),
            )
            .service(
                kernel::error::resource("/products/{id}/stock").route(web::put().to(set_stock)),
            ),
    );
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error(transparent)]
    Invalid(#[from] Invalid),
    #[error("a product with sku {0:?} already exists")]
    DuplicateSku(String),
    #[error("no product {0}")]
    NotFound(String),
    #[error("product {0} belongs to another seller")]
    NotOwner(String),
    #[error("product {0} is delisted")]
    Delisted(String),
    #[error(transparent)]
    Stock(#[from] StockError),
    #[error("the cursor is not one this API returned")]
    InvalidCursor,
    #[error("{0}")]
    Denied(Problem),
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<diesel::result::Error> for CatalogError {
    fn from(e: diesel::result::Error) -> Self {
        Self::Db(DbError::Query(e))
    }
}

impl CatalogError {
    fn problem(&self) -> Problem {
        let detail = self.to_string();
        match self {
            Self::Invalid(_) => Problem::unprocessable("validation_failed", detail),
            Self::DuplicateSku(_) => Problem::conflict("duplicate_sku", detail),
            Self::NotFound(_) => Problem::not_found("product_not_found", detail),
            Self::NotOwner(_) => Problem::new(StatusCode::FORBIDDEN, "not_product_owner", detail),
            Self::Delisted(_) => Problem::conflict("product_delisted", detail),
            Self::Stock(StockError::Negative) => {
                Problem::unprocessable("validation_failed", detail)
            }
            Self::Stock(StockError::BelowReserved { .. }) => {
                Problem::conflict("stock_below_reserved", detail)
            }
            Self::InvalidCursor => Problem::bad_request("invalid_cursor", detail),
            Self::Denied(p) => p.clone(),
            Self::Db(e) => e.problem(MODULE),
        }
    }
}

impl actix_web::ResponseError for CatalogError {
    fn status_code(&self) -> StatusCode {
        self.problem().status_code()
    }

    fn error_response(&self) -> HttpResponse {
        self.problem().to_response()
    }
}

/// Stock levels of a product.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct StockView {
    pub on_hand: i64,
    pub reserved: i64,
    pub available: i64,
}

/// A product as clients see it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ProductView {
    pub id: String,
    pub sku: String,
    pub seller_id: String,
    pub name: String,
    pub description: Option<String>,
    #[schema(value_type = kernel::openapi::MoneySchema)]
    pub price: Money,
    pub stock: StockView,
    /// `listed`, or `delisted` once withdrawn from sale.
    pub status: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl From<ProductRow> for ProductView {
    fn from(r: ProductRow) -> Self {
        let available = r.stock().available();
        Self {
            id: r.id,
            sku: r.sku,
            seller_id: r.seller_id,
            name: r.name,
            description: r.description,
            price: Money::new(r.price_minor, r.currency),
            stock: StockView {
                on_hand: r.on_hand,
                reserved: r.reserved,
                available,
            },
            status: if r.listed { "listed" } else { "delisted" }.to_string(),
            created_at: r.created_at.and_utc(),
            updated_at: r.updated_at.and_utc(),
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ProductPage {
    pub items: Vec<ProductView>,
    /// Pass as `cursor` for the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateProduct {
    pub sku: String,
    pub name: String,
    pub description: Option<String>,
    #[schema(value_type = kernel::openapi::MoneySchema)]
    pub price: Money,
    /// Units on hand.
    pub stock: i64,
}

/// `null` clears a field; an absent field is left as it is.
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateProduct {
    pub name: Option<String>,
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    pub description: Option<Option<String>>,
    #[schema(value_type = Option<kernel::openapi::MoneySchema>)]
    pub price: Option<Money>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetStock {
    pub on_hand: i64,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    /// 1 to 100, default 20.
    pub limit: Option<i64>,
    pub cursor: Option<String>,
}

fn owner_or_admin(caller: &Caller, product: &ProductRow) -> Result<(), CatalogError> {
    if caller.is_admin() || caller.subject == product.seller_id {
        Ok(())
    } else {
        Err(CatalogError::NotOwner(product.id.clone()))
    }
}

fn stock_event(r: &ProductRow) -> StockChanged {
    StockChanged {
        product_id: parse_id(&r.id).0,
        on_hand: r.on_hand,
        reserved: r.reserved,
        available: r.stock().available(),
    }
}

fn parse_id(raw: &str) -> ProductId {
    // Ids in our own table were written by us and are valid; a foreign one maps to nil.
    ProductId(Uuid::parse_str(raw).unwrap_or_default())
}

/// An id from the path: anything but a UUID cannot name a product.
fn path_id(raw: &str) -> Result<String, CatalogError> {
    Uuid::parse_str(raw)
        .map(|u| u.to_string())
        .map_err(|_| CatalogError::NotFound(raw.to_string()))
}

fn load_for_change(
    conn: &mut AnyConnection,
    id: &str,
    caller: &Caller,
) -> Result<ProductRow, CatalogError> {
    let row = store::lock(conn, id)?.ok_or_else(|| CatalogError::NotFound(id.to_string()))?;
    owner_or_admin(caller, &row)?;
    if !row.listed {
        return Err(CatalogError::Delisted(id.to_string()));
    }
    Ok(row)
}

#[utoipa::path(
    post, path = "/api/v1/catalog/products", tag = "catalog",
    request_body = CreateProduct,
    responses(
        (status = 201, body = ProductView),
        (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 409, description = "duplicate sku", body = Problem),
        (status = 422, body = Problem)
    ),
    security(("bearer" = []))
)]
pub async fn create_product(
    db: web::Data<Db>,
    caller: Caller,
    ctx: RequestContext,
    body: web::Json<CreateProduct>,
) -> Result<HttpResponse, CatalogError> {
    caller.require(&[Role::Seller, Role::Admin])?;
    let row = list_product(
        &db,
        &caller.subject,
        body.into_inner(),
        ctx.publisher(MODULE),
    )
    .await?;
    tracing::info!(product.id = %row.id, "product listed");
    Ok(HttpResponse::Created()
        .insert_header(("Location", format!("/api/v1/catalog/products/{}", row.id)))
        .json(ProductView::from(row)))
}

/// Lists a new product for `seller_id`: validates it, stores it and publishes
/// `catalog.product_listed.v1` in one transaction.
pub async fn list_product(
    db: &Db,
    seller_id: &str,
    body: CreateProduct,
    publisher: Publisher,
) -> Result<ProductRow, CatalogError> {
    let sku = Sku::parse(&body.sku)?;
    let name = domain::parse_name(&body.name)?;
    let description = domain::parse_description(body.description.as_deref())?;
    let price = domain::parse_price(&body.price)?;
    let stock = Stock::new(body.stock)?;
    let id = ProductId::new();
    let now = kernel::time::now();
    let row = ProductRow {
        id: id.to_string(),
        sku: sku.as_str().to_string(),
        seller_id: seller_id.to_string(),
        name,
        description,
        price_minor: price.amount_minor,
        currency: price.currency.clone(),
        on_hand: stock.on_hand,
        reserved: stock.reserved,
        listed: true,
        created_at: now,
        updated_at: now,
    };
    db.write(move |conn| {
        store::insert(conn, &row).map_err(|e| {
            if store::is_unique_violation(&e) {
                CatalogError::DuplicateSku(row.sku.clone())
            } else {
                e.into()
            }
        })?;
        let event = ProductListed {
            product_id: id.0,
            seller_id: row.seller_id.clone(),
            sku: row.sku.clone(),
            name: row.name.clone(),
            description: row.description.clone(),
            price: Money::new(row.price_minor, row.currency.clone()),
            available: row.stock().available(),
        };
        publisher.publish(conn, &row.id, &event)?;
        Ok::<_, CatalogError>(row)
    })
    .await
}

#[utoipa::path(
    get, path = "/api/v1/catalog/products", tag = "catalog",
    params(PageQuery),
    responses((status = 200, body = ProductPage), (status = 400, body = Problem))
)]
pub async fn list_products(
    db: web::Data<Db>,
    query: web::Query<PageQuery>,
) -> Result<web::Json<ProductPage>, CatalogError> {
    let limit = query.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(Invalid {
            field: "limit",
            message: format!("must be between 1 and {MAX_PAGE}"),
        }
        .into());
    }
    let after = match &query.cursor {
        None => None,
        Some(c) => Some(decode_cursor(c)?),
    };
    let mut rows = db
        .read(move |conn| {
            store::page(conn, after.as_deref(), limit + 1).map_err(CatalogError::from)
        })
        .await?;
    let has_more = rows.len() > usize::try_from(limit).unwrap_or(usize::MAX);
    rows.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    let next_cursor = if has_more {
        rows.last().map(|r| URL_SAFE_NO_PAD.encode(r.id.as_bytes()))
    } else {
        None
    };
    Ok(web::Json(ProductPage {
        items: rows.into_iter().map(ProductView::from).collect(),
        next_cursor,
    }))
}

fn decode_cursor(cursor: &str) -> Result<String, CatalogError> {
    URL_SAFE_NO_PAD
        .decode(cursor)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .filter(|s| Uuid::parse_str(s).is_ok())
        .ok_or(CatalogError::InvalidCursor)
}

#[utoipa::path(
    get, path = "/api/v1/catalog/products/{id}", tag = "catalog",
    params(("id" = String, Path, description = "product id")),
    responses((status = 200, body = ProductView), (status = 404, body = Problem))
)]
pub async fn get_product(
    products: web::Data<ProductLookups>,
    id: web::Path<String>,
) -> Result<web::Json<ProductView>, CatalogError> {
    let id = path_id(&id)?;
    let row = products
        .get(id.clone())
        .await?
        .ok_or(CatalogError::NotFound(id))?;
    Ok(web::Json(row.into()))
}

#[utoipa::path(
    patch, path = "/api/v1/catalog/products/{id}", tag = "catalog",
    params(("id" = String, Path, description = "product id")),
    request_body = UpdateProduct,
    responses(
        (status = 200, body = ProductView), (status = 401, body = Problem),
        (status = 403, body = Problem), (status = 404, body = Problem), (status = 422, body = Problem)
    ),
    security(("bearer" = []))
)]
pub async fn update_product(
    db: web::Data<Db>,
    caller: Caller,
    ctx: RequestContext,
    id: web::Path<String>,
    body: web::Json<UpdateProduct>,
) -> Result<web::Json<ProductView>, CatalogError> {
    caller.require(&[Role::Seller, Role::Admin])?;
    let id = path_id(&id)?;
    let body = body.into_inner();
    let name = body.name.as_deref().map(domain::parse_name).transpose()?;
    let description = body
        .description
        .map(|d| domain::parse_description(d.as_deref()))
        .transpose()?;
    let price = body.price.as_ref().map(domain::parse_price).transpose()?;
    let publisher = ctx.publisher(MODULE);
    let row = db
        .write(move |conn| {
            let before = load_for_change(conn, &id, &caller)?;
            let now = kernel::time::now();
            let details_changed = name.as_ref().is_some_and(|n| *n != before.name)
                || description
                    .as_ref()
                    .is_some_and(|d| *d != before.description);
            let old_price = Money::new(before.price_minor, before.currency.clone());
            let price_changed = price.as_ref().is_some_and(|p| *p != old_price);
            if !details_changed && !price_changed {
                return Ok(before);
            }
            store::update(
                conn,
                &id,
                &ProductChanges {
                    name: name.clone(),
                    description: description.clone(),
                    price_minor: price.as_ref().map(|p| p.amount_minor),
                    currency: price.as_ref().map(|p| p.currency.clone()),
                    updated_at: Some(now),
                },
            )?;
            let after =
                store::find(conn, &id)?.ok_or_else(|| CatalogError::NotFound(id.clone()))?;
            if details_changed {
                let event = ProductDetailsChanged {
                    product_id: parse_id(&id).0,
                    name: after.name.clone(),
                    description: after.description.clone(),
                };
                publisher.publish(conn, &id, &event)?;
            }
            if let Some(price) = price.filter(|_| price_changed) {
                let event = PriceChanged {
                    product_id: parse_id(&id).0,
                    old_price,
                    price,
                };
                publisher.publish(conn, &id, &event)?;
            }
            Ok::<_, CatalogError>(after)
        })
        .await?;
    Ok(web::Json(row.into()))
}

#[utoipa::path(
    put, path = "/api/v1/catalog/products/{id}/stock", tag = "catalog",
    params(("id" = String, Path, description = "product id")),
    request_body = SetStock,
    responses(
        (status = 200, body = ProductView), (status = 404, body = Problem),
        (status = 409, description = "below reserved units", body = Problem), (status = 422, body = Problem)
    ),
    security(("bearer" = []))
)]
pub async fn set_stock(
    db: web::Data<Db>,
    caller: Caller,
    ctx: RequestContext,
    id: web::Path<String>,
    body: web::Json<SetStock>,
) -> Result<web::Json<ProductView>, CatalogError> {
    caller.require(&[Role::Seller, Role::Admin])?;
    let id = path_id(&id)?;
    let on_hand = body.on_hand;
    if on_hand < 0 {
        return Err(StockError::Negative.into());
    }
    let publisher = ctx.publisher(MODULE);
    let row = db
        .write(move |conn| {
            let before = load_for_change(conn, &id, &caller)?;
            let stock = before.stock().with_on_hand(on_hand)?;
            if stock.on_hand == before.on_hand {
                return Ok(before);
            }
            store::set_on_hand(conn, &id, stock.on_hand, kernel::time::now())?;
            let after =
                store::find(conn, &id)?.ok_or_else(|| CatalogError::NotFound(id.clone()))?;
            publisher.publish(conn, &id, &stock_event(&after))?;
            Ok::<_, CatalogError>(after)
        })
        .await?;
    Ok(web::Json(row.into()))
}

#[utoipa::path(
    delete, path = "/api/v1/catalog/products/{id}", tag = "catalog",
    params(("id" = String, Path, description = "product id")),
    responses((status = 204, description = "delisted"), (status = 403, body = Problem), (status = 404, body = Problem)),
    security(("bearer" = []))
)]
pub async fn delist_product(
    db: web::Data<Db>,
    caller: Caller,
    ctx: RequestContext,
    id: web::Path<String>,
) -> Result<HttpResponse, CatalogError> {
    caller.require(&[Role::Seller, Role::Admin])?;
    let id = path_id(&id)?;
    let publisher = ctx.publisher(MODULE);
    db.write(move |conn| {
        let row = store::lock(conn, &id)?.ok_or_else(|| CatalogError::NotFound(id.clone()))?;
        owner_or_admin(&caller, &row)?;
        if row.listed {
            store::delist(conn, &id, kernel::time::now())?;
            let event = ProductDelisted {
                product_id: parse_id(&id).0,
            };
            publisher.publish(conn, &id, &event)?;
        }
        Ok::<_, CatalogError>(())
    })
    .await?;
    Ok(HttpResponse::NoContent().finish())
}

impl From<Problem> for CatalogError {
    fn from(p: Problem) -> Self {
        Self::Denied(p)
    }
}

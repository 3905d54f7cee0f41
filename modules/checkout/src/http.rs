//! Checkout routes: `/api/v1/checkout/orders`.

use std::sync::Arc;

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use chrono::{DateTime, Utc};
use contracts::Money;
use contracts::cart::{CallContext, CartQueries, CartSnapshot};
use contracts::checkout::{Address, CancellationRequested, OrderLine, OrderPlaced};
use kernel::auth::{Caller, Role};
use kernel::context::RequestContext;
use kernel::db::DbError;
use kernel::error::resource;
use kernel::{AnyConnection, Db, Problem};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::MODULE;
use crate::domain::{self, CancelDecision, CancelRefusal, Invalid, OrderState};
use crate::payment::PaymentGateway;
use crate::store::{self, IdempotencyRow, LineRow, OrderRow};

/// What the order routes need besides the database.
pub struct Deps {
    pub cart: Option<Arc<dyn CartQueries>>,
    pub gateway: Arc<dyn PaymentGateway>,
}

pub fn routes(cfg: &mut web::ServiceConfig, db: Db, deps: Deps) {
    cfg.service(
        web::scope("/api/v1/checkout")
            .app_data(web::Data::new(db))
            .app_data(web::Data::new(deps))
            .service(
                resource("/orders")
                    .route(web::post().to(place_order))
                    .route(web::get().to(list_orders)),
            )
            .service(resource("/orders/{id}").route(web::get().to(get_order)))
            .service(resource("/orders/{id}/cancel").route(web::post().to(cancel_order))),
    );
}

#[derive(Debug, thiserror::Error)]
pub enum CheckoutError {
    #[error("send an Idempotency-Key header: placing an order must be safe to retry")]
    KeyRequired,
    #[error("the Idempotency-Key must be 1 to 255 visible ASCII characters")]
    KeyInvalid,
    #[error("this Idempotency-Key was used for a different request")]
    KeyReused,
    #[error(transparent)]
    Invalid(#[from] Invalid),
    #[error("unknown payment token")]
    PaymentToken,
    #[error("the cart is empty")]
    EmptyCart,
    #[error("the cart holds products no longer sold: {0}")]
    Unavailable(String),
    #[error("{0}")]
    CartUnavailable(String),
    #[error("no order {0}")]
    NotFound(String),
    #[error(transparent)]
    Cancel(#[from] CancelRefusal),
    #[error("{0}")]
    Denied(Problem),
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<diesel::result::Error> for CheckoutError {
    fn from(e: diesel::result::Error) -> Self {
        Self::Db(DbError::Query(e))
    }
}

impl From<Problem> for CheckoutError {
    fn from(p: Problem) -> Self {
        Self::Denied(p)
    }
}

impl CheckoutError {
    fn problem(&self) -> Problem {
        let detail = self.to_string();
        match self {
            Self::KeyRequired => Problem::bad_request("idempotency_key_required", detail),
            Self::KeyInvalid => Problem::bad_request("invalid_idempotency_key", detail),
            Self::KeyReused => Problem::unprocessable("idempotency_key_reused", detail),
            Self::Invalid(_) => Problem::unprocessable("validation_failed", detail),
            Self::PaymentToken => Problem::unprocessable("invalid_payment_token", detail),
            Self::EmptyCart => Problem::unprocessable("empty_cart", detail),
            Self::Unavailable(_) => Problem::unprocessable("product_unavailable", detail),
            Self::CartUnavailable(_) => Problem::unavailable("cart_unavailable", detail),
            Self::NotFound(_) => Problem::not_found("order_not_found", detail),
            Self::Cancel(CancelRefusal::AlreadyDispatched) => {
                Problem::conflict("already_dispatched", detail)
            }
            Self::Cancel(CancelRefusal::NotCancellable(_)) => {
                Problem::conflict("order_not_cancellable", detail)
            }
            Self::Denied(p) => p.clone(),
            Self::Db(e) => e.problem(MODULE),
        }
    }
}

impl actix_web::ResponseError for CheckoutError {
    fn status_code(&self) -> StatusCode {
        self.problem().status_code()
    }

    fn error_response(&self) -> HttpResponse {
        self.problem().to_response()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddressBody {
    pub name: String,
    pub line1: String,
    pub city: String,
    pub postal_code: String,
    /// ISO 3166-1 alpha-2, like DE.
    pub country: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlaceOrder {
    pub shipping_address: AddressBody,
    /// `tok_ok` or `tok_decline` with the built-in test gateway.
    pub payment_token: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct OrderItemView {
    pub product_id: String,
    pub name: String,
    pub quantity: i64,
    #[schema(value_type = kernel::openapi::MoneySchema)]
    pub unit_price: Money,
    #[schema(value_type = kernel::openapi::MoneySchema)]
    pub line_total: Money,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct OrderView {
    pub id: String,
    /// `pending`, `confirmed`, `rejected`, `cancelled` or `fulfilled`.
    pub status: String,
    pub items: Vec<OrderItemView>,
    #[schema(value_type = kernel::openapi::MoneySchema)]
    pub total: Money,
    /// For rejected and cancelled orders: `out_of_stock`, `payment_declined`, `cancelled_by_customer`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub shipping_address: AddressBody,
    /// A cancellation is being settled with delivery.
    pub cancel_requested: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct OrderList {
    pub items: Vec<OrderView>,
}

pub fn address_of(order: &OrderRow) -> Address {
    Address {
        name: order.shipping_name.clone(),
        line1: order.shipping_line1.clone(),
        city: order.shipping_city.clone(),
        postal_code: order.shipping_postal_code.clone(),
        country: order.shipping_country.clone(),
    }
}

pub fn contract_lines(lines: &[LineRow]) -> Vec<OrderLine> {
    lines
        .iter()
        .map(|l| OrderLine {
            product_id: Uuid::parse_str(&l.product_id).unwrap_or_default(),
            name: l.name.clone(),
            quantity: l.quantity,
            unit_price: Money::new(l.unit_price_minor, l.currency.clone()),
        })
        .collect()
}

fn view(order: OrderRow, lines: Vec<LineRow>) -> OrderView {
    let address = address_of(&order);
    OrderView {
        items: lines
            .into_iter()
            .map(|l| OrderItemView {
                product_id: l.product_id,
                name: l.name,
                quantity: l.quantity,
                unit_price: Money::new(l.unit_price_minor, l.currency.clone()),
                line_total: Money::new(l.unit_price_minor.saturating_mul(l.quantity), l.currency),
            })
            .collect(),
        total: Money::new(order.total_minor, order.currency),
        status: order.status,
        reason: order.reason,
        shipping_address: AddressBody {
            name: address.name,
            line1: address.line1,
            city: address.city,
            postal_code: address.postal_code,
            country: address.country,
        },
        cancel_requested: order.cancel_requested,
        created_at: order.created_at.and_utc(),
        updated_at: order.updated_at.and_utc(),
        id: order.id,
    }
}

fn load_view(conn: &mut AnyConnection, id: &str) -> Result<OrderView, CheckoutError> {
    let order = store::find(conn, id)?.ok_or_else(|| CheckoutError::NotFound(id.to_string()))?;
    let lines = store::lines(conn, id)?;
    Ok(view(order, lines))
}

/// The order `id` as `caller` may see it: their own, or any for an admin.
fn visible(
    conn: &mut AnyConnection,
    id: &str,
    caller: &Caller,
) -> Result<OrderView, CheckoutError> {
    let order = store::find(conn, id)?.ok_or_else(|| CheckoutError::NotFound(id.to_string()))?;
    if order.customer_id != caller.subject && !caller.is_admin() {
        // Another customer's order does not exist as far as this caller knows.
        return Err(CheckoutError::NotFound(id.to_string()));
    }
    let lines = store::lines(conn, id)?;
    Ok(view(order, lines))
}

fn fingerprint(body: &PlaceOrder) -> String {
    let canonical = serde_json::to_vec(body).unwrap_or_default();
    Sha256::digest(&canonical)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn accepted(order: &OrderView, replayed: bool) -> HttpResponse {
    let mut res = HttpResponse::Accepted();
    res.insert_header(("Location", format!("/api/v1/checkout/orders/{}", order.id)));
    if replayed {
        res.insert_header(("Idempotent-Replayed", "true"));
    }
    res.json(order)
}

/// The order an earlier request with this key created, if the request was the same.
fn replay(
    conn: &mut AnyConnection,
    customer: &str,
    key: &str,
    fingerprint: &str,
) -> Result<Option<OrderView>, CheckoutError> {
    match store::find_key(conn, customer, key)? {
        None => Ok(None),
        Some(row) if row.fingerprint == fingerprint => load_view(conn, &row.order_id).map(Some),
        Some(_) => Err(CheckoutError::KeyReused),
    }
}

/// What a placement needs before it writes: a valid address, a token the gateway
/// accepts, and a cart with something in it, every line still for sale.
async fn check_placement(
    deps: &Deps,
    body: &PlaceOrder,
    customer: &str,
    req: &HttpRequest,
    ctx: &RequestContext,
) -> Result<(Address, CartSnapshot, Money), CheckoutError> {
    let a = &body.shipping_address;
    let address = domain::parse_address(&Address {
        name: a.name.clone(),
        line1: a.line1.clone(),
        city: a.city.clone(),
        postal_code: a.postal_code.clone(),
        country: a.country.clone(),
    })?;
    if !deps.gateway.accepts(&body.payment_token) {
        return Err(CheckoutError::PaymentToken);
    }
    let cart_port = deps.cart.clone().ok_or_else(|| {
        CheckoutError::CartUnavailable("the cart module is not reachable from this process".into())
    })?;
    let call = CallContext {
        bearer: req
            .headers()
            .get(actix_web::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_string),
        traceparent: Some(ctx.trace.child().to_string()),
    };
    let cart = cart_port
        .snapshot(customer, &call)
        .await
        .map_err(|e| CheckoutError::CartUnavailable(e.to_string()))?;
    let Some(total) = cart.total.clone() else {
        return Err(CheckoutError::EmptyCart);
    };
    let unavailable: Vec<String> = cart
        .lines
        .iter()
        .filter(|l| !l.available)
        .map(|l| l.name.clone())
        .collect();
    if !unavailable.is_empty() {
        return Err(CheckoutError::Unavailable(unavailable.join(", ")));
    }
    Ok((address, cart, total))
}

/// Refuses a placement, unless its key placed an order already: the answer is then
/// that order for the same request (a retry finds the cart emptied by that order's
/// confirmation, or the cart unreachable), and `KeyReused` for another.
async fn refuse_unless_replayed(
    db: &Db,
    customer: &str,
    key: &str,
    fingerprint: &str,
    refusal: CheckoutError,
) -> Result<HttpResponse, CheckoutError> {
    let (c, k, f) = (
        customer.to_string(),
        key.to_string(),
        fingerprint.to_string(),
    );
    match db.read(move |conn| replay(conn, &c, &k, &f)).await? {
        Some(order) => Ok(accepted(&order, true)),
        None => Err(refusal),
    }
}

#[utoipa::path(
    post, path = "/api/v1/checkout/orders", tag = "checkout",
    params(("Idempotency-Key" = String, Header, description = "makes the placement safe to retry")),
    request_body = PlaceOrder,
    responses(
        (status = 202, description = "placed; the saga settles it", body = OrderView),
        (status = 400, body = Problem), (status = 401, body = Problem), (status = 403, body = Problem),
        (status = 422, description = "empty cart, bad address, unknown token, key reused", body = Problem),
        (status = 503, description = "the cart cannot be read", body = Problem)
    ),
    security(("bearer" = []))
)]
pub async fn place_order(
    db: web::Data<Db>,
    deps: web::Data<Deps>,
    caller: Caller,
    ctx: RequestContext,
    req: HttpRequest,
    body: web::Json<PlaceOrder>,
) -> Result<HttpResponse, CheckoutError> {
    caller.require(&[Role::Customer])?;
    let customer = caller.subject.clone();
    let raw_key = req
        .headers()
        .get("Idempotency-Key")
        .ok_or(CheckoutError::KeyRequired)?
        .to_str()
        .map_err(|_| CheckoutError::KeyInvalid)?;
    let key = domain::parse_idempotency_key(raw_key).ok_or(CheckoutError::KeyInvalid)?;
    let body = body.into_inner();
    let fingerprint = fingerprint(&body);

    // The key is looked up only where this request would be refused, or where its
    // key collides: a new placement, the common case, reads nothing of checkout's
    // before its one write transaction.
    let checked = check_placement(&deps, &body, &customer, &req, &ctx).await;
    let (address, cart, total) = match checked {
        Ok(checked) => checked,
        Err(refusal) => {
            return refuse_unless_replayed(&db, &customer, &key, &fingerprint, refusal).await;
        }
    };

    let order_id = Uuid::now_v7();
    let now = kernel::time::now();
    let order = OrderRow {
        id: order_id.to_string(),
        customer_id: customer.clone(),
        status: "pending".into(),
        reason: None,
        total_minor: total.amount_minor,
        currency: total.currency.clone(),
        shipping_name: address.name.clone(),
        shipping_line1: address.line1.clone(),
        shipping_city: address.city.clone(),
        shipping_postal_code: address.postal_code.clone(),
        shipping_country: address.country.clone(),
        payment_token: body.payment_token.clone(),
        payment_state: OrderState::placed().payment.as_str().into(),
        payment_attempts: 0,
        payment_due_at: None,
        payment_error: None,
        shipment_state: OrderState::placed().shipment.as_str().into(),
        cancel_requested: false,
        correlation_id: ctx.correlation_id.to_string(),
        traceparent: Some(ctx.trace.to_string()),
        created_at: now,
        updated_at: now,
    };
    let lines: Vec<LineRow> = cart
        .lines
        .iter()
        .map(|l| LineRow {
            order_id: order.id.clone(),
            product_id: l.product_id.to_string(),
            name: l.name.clone(),
            quantity: l.quantity,
            unit_price_minor: l.unit_price.amount_minor,
            currency: l.unit_price.currency.clone(),
        })
        .collect();
    let placed = OrderPlaced {
        order_id,
        customer_id: customer.clone(),
        lines: contract_lines(&lines),
        total,
        shipping_address: address,
    };
    let publisher = ctx.publisher(MODULE);
    let key_row = IdempotencyRow {
        customer_id: customer.clone(),
        idempotency_key: key.clone(),
        fingerprint: fingerprint.clone(),
        order_id: order.id.clone(),
        created_at: now,
    };
    let created = db
        .write_single(move |conn| {
            store::place(conn, &key_row, &order, &lines, &publisher, &placed)?;
            Ok::<_, CheckoutError>(view(order, lines))
        })
        .await;
    match created {
        Ok(order) => {
            tracing::info!(order.id = %order.id, "order placed");
            Ok(accepted(&order, false))
        }
        Err(CheckoutError::Db(DbError::Query(e))) if store::is_unique_violation(&e) => {
            // A concurrent request with the same key won: answer as a replay of it.
            let order = db
                .read(move |conn| replay(conn, &customer, &key, &fingerprint))
                .await?
                .ok_or_else(|| CheckoutError::Db(DbError::Query(e)))?;
            Ok(accepted(&order, true))
        }
        Err(e) => Err(e),
    }
}

#[utoipa::path(
    get, path = "/api/v1/checkout/orders/{id}", tag = "checkout",
    params(("id" = String, Path, description = "order id")),
    responses((status = 200, body = OrderView), (status = 404, body = Problem)),
    security(("bearer" = []))
)]
pub async fn get_order(
    db: web::Data<Db>,
    caller: Caller,
    id: web::Path<String>,
) -> Result<web::Json<OrderView>, CheckoutError> {
    let id = id.into_inner();
    let order = db.read(move |conn| visible(conn, &id, &caller)).await?;
    Ok(web::Json(order))
}

#[utoipa::path(
    get, path = "/api/v1/checkout/orders", tag = "checkout",
    responses((status = 200, description = "the caller's orders, newest first", body = OrderList)),
    security(("bearer" = []))
)]
pub async fn list_orders(
    db: web::Data<Db>,
    caller: Caller,
) -> Result<web::Json<OrderList>, CheckoutError> {
    let customer = caller.subject.clone();
    let items = db
        .read(move |conn| {
            let orders = store::of_customer(conn, &customer, 100)?;
            orders
                .into_iter()
                .map(|o| {
                    let lines = store::lines(conn, &o.id)?;
                    Ok(view(o, lines))
                })
                .collect::<Result<Vec<_>, CheckoutError>>()
        })
        .await?;
    Ok(web::Json(OrderList { items }))
}

#[utoipa::path(
    post, path = "/api/v1/checkout/orders/{id}/cancel", tag = "checkout",
    params(("id" = String, Path, description = "order id")),
    responses(
        (status = 200, description = "cancelled", body = OrderView),
        (status = 202, description = "being settled with delivery", body = OrderView),
        (status = 404, body = Problem),
        (status = 409, description = "dispatched already, or not cancellable", body = Problem)
    ),
    security(("bearer" = []))
)]
pub async fn cancel_order(
    db: web::Data<Db>,
    caller: Caller,
    id: web::Path<String>,
) -> Result<HttpResponse, CheckoutError> {
    let id = id.into_inner();
    let (order, decision) = db
        .write(move |conn| {
            let order =
                store::lock(conn, &id)?.ok_or_else(|| CheckoutError::NotFound(id.clone()))?;
            if order.customer_id != caller.subject && !caller.is_admin() {
                return Err(CheckoutError::NotFound(id.clone()));
            }
            let (next, decision) = order.state().request_cancel()?;
            if decision == (CancelDecision::Requested { first: true }) {
                store::save_state(conn, &id, next, order.payment_due_at, kernel::time::now())?;
                let event = CancellationRequested {
                    order_id: Uuid::parse_str(&id).unwrap_or_default(),
                    customer_id: order.customer_id.clone(),
                };
                order.publisher().publish(conn, &id, &event)?;
            }
            Ok((load_view(conn, &id)?, decision))
        })
        .await?;
    Ok(match decision {
        CancelDecision::AlreadyCancelled => HttpResponse::Ok().json(order),
        CancelDecision::Requested { .. } => HttpResponse::Accepted().json(order),
    })
}

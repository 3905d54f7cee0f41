//! Delivery routes: `/api/v1/delivery/shipments`.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, web};
use chrono::{DateTime, Utc};
use kernel::auth::{Caller, Role};
use kernel::context::RequestContext;
use kernel::db::DbError;
use kernel::error::resource;
use kernel::{AnyConnection, Db, Problem};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::MODULE;
use crate::shipping::{self, Move, ShippingError};
use crate::store::{self, ShipmentRow};

pub fn routes(cfg: &mut web::ServiceConfig, db: Db) {
    cfg.service(
        web::scope("/api/v1/delivery")
            .app_data(web::Data::new(db))
            .service(resource("/shipments").route(web::get().to(list_shipments)))
            .service(resource("/shipments/{id}").route(web::get().to(get_shipment)))
            .service(resource("/shipments/{id}/dispatch").route(web::post().to(dispatch)))
            .service(resource("/shipments/{id}/deliver").route(web::post().to(deliver))),
    );
}

#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error(transparent)]
    Shipping(#[from] ShippingError),
    #[error("{0}")]
    Denied(Problem),
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<diesel::result::Error> for DeliveryError {
    fn from(e: diesel::result::Error) -> Self {
        Self::Shipping(ShippingError::Query(e))
    }
}

impl From<Problem> for DeliveryError {
    fn from(p: Problem) -> Self {
        Self::Denied(p)
    }
}

impl DeliveryError {
    fn problem(&self) -> Problem {
        let detail = self.to_string();
        match self {
            Self::Shipping(ShippingError::NotFound(_)) => {
                Problem::not_found("shipment_not_found", detail)
            }
            Self::Shipping(ShippingError::Transition(_)) => {
                Problem::conflict("invalid_transition", detail)
            }
            Self::Shipping(ShippingError::Query(e)) => Problem::internal(e),
            Self::Shipping(ShippingError::Db(e)) => Problem::internal(e),
            Self::Denied(p) => p.clone(),
            Self::Db(e) => e.problem(MODULE),
        }
    }
}

impl actix_web::ResponseError for DeliveryError {
    fn status_code(&self) -> StatusCode {
        self.problem().status_code()
    }

    fn error_response(&self) -> HttpResponse {
        self.problem().to_response()
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AddressView {
    pub name: String,
    pub line1: String,
    pub city: String,
    pub postal_code: String,
    pub country: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ShipmentEventView {
    pub status: String,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ShipmentView {
    pub id: String,
    pub order_id: String,
    /// `preparing`, `dispatched`, `delivered` (or `cancelled`).
    pub status: String,
    pub address: AddressView,
    pub events: Vec<ShipmentEventView>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ShipmentList {
    pub items: Vec<ShipmentView>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ShipmentFilter {
    pub order_id: Option<String>,
}

fn view(conn: &mut AnyConnection, row: ShipmentRow) -> Result<ShipmentView, DeliveryError> {
    let events = store::events(conn, &row.id)?
        .into_iter()
        .map(|(status, at)| ShipmentEventView {
            status,
            at: at.and_utc(),
        })
        .collect();
    Ok(ShipmentView {
        events,
        address: AddressView {
            name: row.name,
            line1: row.line1,
            city: row.city,
            postal_code: row.postal_code,
            country: row.country,
        },
        created_at: row.created_at.and_utc(),
        updated_at: row.updated_at.and_utc(),
        id: row.id,
        order_id: row.order_id,
        status: row.status,
    })
}

#[utoipa::path(
    get, path = "/api/v1/delivery/shipments", tag = "delivery", params(ShipmentFilter),
    responses((status = 200, description = "the caller's shipments (all for an admin)", body = ShipmentList)),
    security(("bearer" = []))
)]
pub async fn list_shipments(
    db: web::Data<Db>,
    caller: Caller,
    filter: web::Query<ShipmentFilter>,
) -> Result<web::Json<ShipmentList>, DeliveryError> {
    let filter = filter.into_inner();
    let items = db
        .read(move |conn| {
            let customer = (!caller.is_admin()).then_some(caller.subject.as_str());
            store::list(conn, customer, filter.order_id.as_deref())?
                .into_iter()
                .map(|row| view(conn, row))
                .collect::<Result<Vec<_>, _>>()
        })
        .await?;
    Ok(web::Json(ShipmentList { items }))
}

#[utoipa::path(
    get, path = "/api/v1/delivery/shipments/{id}", tag = "delivery",
    params(("id" = String, Path, description = "shipment id")),
    responses((status = 200, body = ShipmentView), (status = 404, body = Problem)),
    security(("bearer" = []))
)]
pub async fn get_shipment(
    db: web::Data<Db>,
    caller: Caller,
    id: web::Path<String>,
) -> Result<web::Json<ShipmentView>, DeliveryError> {
    let id = id.into_inner();
    let shipment = db
        .read(move |conn| {
            let row = store::find(conn, &id)?
                .filter(|r| caller.is_admin() || r.customer_id == caller.subject)
                .ok_or_else(|| ShippingError::NotFound(id.clone()))?;
            view(conn, row)
        })
        .await?;
    Ok(web::Json(shipment))
}

async fn advance(
    db: &Db,
    caller: &Caller,
    ctx: &RequestContext,
    id: String,
    step: Move,
) -> Result<ShipmentView, DeliveryError> {
    caller.require(&[Role::Admin])?;
    let publisher = ctx.publisher(MODULE);
    db.write(move |conn| {
        let row = shipping::advance(conn, &publisher, &id, step)?;
        view(conn, row)
    })
    .await
}

#[utoipa::path(
    post, path = "/api/v1/delivery/shipments/{id}/dispatch", tag = "delivery",
    params(("id" = String, Path, description = "shipment id")),
    responses((status = 200, body = ShipmentView), (status = 403, body = Problem), (status = 404, body = Problem), (status = 409, body = Problem)),
    security(("bearer" = []))
)]
pub async fn dispatch(
    db: web::Data<Db>,
    caller: Caller,
    ctx: RequestContext,
    id: web::Path<String>,
) -> Result<web::Json<ShipmentView>, DeliveryError> {
    Ok(web::Json(
        advance(&db, &caller, &ctx, id.into_inner(), Move::Dispatch).await?,
    ))
}

#[utoipa::path(
    post, path = "/api/v1/delivery/shipments/{id}/deliver", tag = "delivery",
    params(("id" = String, Path, description = "shipment id")),
    responses((status = 200, body = ShipmentView), (status = 403, body = Problem), (status = 404, body = Problem), (status = 409, body = Problem)),
    security(("bearer" = []))
)]
pub async fn deliver(
    db: web::Data<Db>,
    caller: Caller,
    ctx: RequestContext,
    id: web::Path<String>,
) -> Result<web::Json<ShipmentView>, DeliveryError> {
    Ok(web::Json(
        advance(&db, &caller, &ctx, id.into_inner(), Move::Deliver).await?,
    ))
}

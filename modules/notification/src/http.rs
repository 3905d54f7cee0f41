//! Notification routes: `/api/v1/notifications` (the caller's own).

use actix_web::web;
use chrono::{DateTime, NaiveDateTime, Utc};
use diesel::prelude::*;
use kernel::auth::Caller;
use kernel::db::DbError;
use kernel::error::resource;
use kernel::{Db, Problem};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::schema::notifications;

pub fn routes(cfg: &mut web::ServiceConfig, db: Db) {
    cfg.service(
        resource("/api/v1/notifications")
            .app_data(web::Data::new(db))
            .route(web::get().to(list_notifications)),
    );
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct NotificationView {
    pub id: String,
    /// `order_confirmed`, `order_rejected`, `order_cancelled`, `shipment_dispatched`, `shipment_delivered`.
    pub kind: String,
    pub order_id: String,
    pub channel: String,
    pub status: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct NotificationList {
    pub items: Vec<NotificationView>,
}

type Row = (String, String, String, String, String, NaiveDateTime);

#[utoipa::path(
    get, path = "/api/v1/notifications", tag = "notification",
    responses((status = 200, description = "the caller's notifications, newest first", body = NotificationList), (status = 401, body = Problem)),
    security(("bearer" = []))
)]
pub async fn list_notifications(
    db: web::Data<Db>,
    caller: Caller,
) -> Result<web::Json<NotificationList>, Problem> {
    let customer = caller.subject;
    let rows: Vec<Row> = db
        .read(move |conn| {
            notifications::table
                .filter(notifications::customer_id.eq(&customer))
                .order((notifications::created_at.desc(), notifications::id.desc()))
                .limit(200)
                .select((
                    notifications::id,
                    notifications::kind,
                    notifications::order_id,
                    notifications::channel,
                    notifications::status,
                    notifications::created_at,
                ))
                .load(conn)
                .map_err(DbError::from)
        })
        .await
        .map_err(|e: DbError| e.problem(crate::MODULE))?;
    let items = rows
        .into_iter()
        .map(
            |(id, kind, order_id, channel, status, created_at)| NotificationView {
                id,
                kind,
                order_id,
                channel,
                status,
                created_at: created_at.and_utc(),
            },
        )
        .collect();
    Ok(web::Json(NotificationList { items }))
}

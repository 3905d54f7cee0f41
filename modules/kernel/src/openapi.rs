//! Schemas for the OpenAPI document of types that live outside the HTTP layer.

/// Money in integer minor units of an ISO 4217 currency (`contracts::Money`).
#[derive(utoipa::ToSchema)]
#[schema(as = Money)]
#[expect(
    dead_code,
    reason = "describes the JSON of contracts::Money; never built"
)]
pub struct MoneySchema {
    /// Minor units (cents); never a float.
    amount_minor: i64,
    /// ISO 4217, three capital letters.
    currency: String,
}

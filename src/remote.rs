//! Query ports of modules that run in another process, over HTTP: bounded in time,
//! retried when the call is idempotent, failed fast by a circuit breaker while the
//! other side keeps failing, and always answered with a clear error, never a hang.

use std::time::Duration;

use contracts::Money;
use contracts::cart::{CallContext, CartLine, CartQueries, CartSnapshot, PortError, PortFuture};
use kernel::resilience::CircuitBreaker;
use serde::Deserialize;

use crate::settings::RemoteSettings;

/// `CartQueries` answered by a cart module in another process, through its public
/// API with the caller's own token (so cart authorises the call as it would the
/// caller's).
pub struct RemoteCart {
    base: String,
    http: reqwest::Client,
    retries: u32,
    breaker: CircuitBreaker,
}

#[derive(Deserialize)]
struct CartView {
    items: Vec<ItemView>,
    total: Option<Money>,
}

#[derive(Deserialize)]
struct ItemView {
    product_id: uuid::Uuid,
    name: String,
    quantity: i64,
    unit_price: Money,
    line_total: Money,
    available: bool,
}

impl RemoteCart {
    pub fn new(settings: &RemoteSettings) -> anyhow::Result<Self> {
        Ok(Self {
            base: settings.url.trim_end_matches('/').to_string(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_millis(settings.timeout_ms.max(1)))
                .connect_timeout(Duration::from_millis(settings.timeout_ms.clamp(1, 1_000)))
                .build()?,
            retries: settings.retries,
            breaker: CircuitBreaker::new(
                settings.breaker_failures,
                Duration::from_millis(settings.breaker_cooldown_ms),
            ),
        })
    }

    fn unavailable(detail: impl Into<String>) -> PortError {
        PortError::Unavailable {
            module: "cart".into(),
            detail: detail.into(),
        }
    }

    /// One GET of the caller's cart; `Err(true)` when worth retrying.
    async fn fetch(&self, call: &CallContext) -> Result<CartView, (bool, String)> {
        let mut request = self.http.get(format!("{}/api/v1/cart", self.base));
        if let Some(bearer) = &call.bearer {
            request = request.bearer_auth(bearer);
        }
        if let Some(traceparent) = &call.traceparent {
            request = request.header("traceparent", traceparent);
        }
        let response = request.send().await.map_err(|e| (true, e.to_string()))?;
        let status = response.status();
        if status.is_success() {
            return response
                .json::<CartView>()
                .await
                .map_err(|e| (false, format!("unreadable answer: {e}")));
        }
        Err((status.is_server_error(), format!("answered {status}")))
    }
}

impl CartQueries for RemoteCart {
    fn snapshot<'a>(
        &'a self,
        customer_id: &'a str,
        call: &'a CallContext,
    ) -> PortFuture<'a, CartSnapshot> {
        Box::pin(async move {
            if !self.breaker.allow() {
                return Err(Self::unavailable(
                    "recent calls failed; not calling for a moment",
                ));
            }
            let mut attempt = 0;
            let view = loop {
                match self.fetch(call).await {
                    Ok(view) => break view,
                    Err((retry, detail)) if retry && attempt < self.retries => {
                        attempt += 1;
                        tracing::warn!(attempt, error = %detail, "cart call failed; retrying");
                        tokio::time::sleep(Duration::from_millis(50 * u64::from(attempt))).await;
                    }
                    Err((_, detail)) => {
                        self.breaker.record_failure();
                        return Err(Self::unavailable(detail));
                    }
                }
            };
            self.breaker.record_success();
            Ok(CartSnapshot {
                customer_id: customer_id.to_string(),
                lines: view
                    .items
                    .into_iter()
                    .map(|i| CartLine {
                        product_id: i.product_id,
                        name: i.name,
                        quantity: i.quantity,
                        unit_price: i.unit_price,
                        line_total: i.line_total,
                        available: i.available,
                    })
                    .collect(),
                total: view.total,
            })
        })
    }
}

//! Channels a notification goes out on, behind the `Sender` trait: `log` (default),
//! `smtp` (an email) and `webhook` (a signed JSON POST). A channel's failure is the notification
//! module's alone: its consumer retries with backoff and parks what is refused.

use std::time::Duration;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// What is told to a customer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Message {
    /// Stable per (order, kind): receivers may deduplicate on it.
    pub id: String,
    pub kind: String,
    pub customer_id: String,
    pub order_id: String,
    pub subject: String,
    pub body: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// Worth trying again later (timeout, 5xx, connection refused).
    #[error("transient: {0}")]
    Transient(String),
    /// The channel refused it and will again (4xx): park it.
    #[error("refused: {0}")]
    Refused(String),
}

pub trait Sender: Send + Sync {
    fn channel(&self) -> &'static str;
    /// Sends one message. Called from the consumer's worker thread.
    fn send(&self, message: &Message) -> Result<(), SendError>;
}

/// Writes notifications to the log.
pub struct LogSender;

impl Sender for LogSender {
    fn channel(&self) -> &'static str {
        "log"
    }

    fn send(&self, message: &Message) -> Result<(), SendError> {
        tracing::info!(
            notification.id = %message.id,
            notification.kind = %message.kind,
            order.id = %message.order_id,
            subject = %message.subject,
            "notification sent"
        );
        Ok(())
    }
}

/// `modules.notification.smtp` settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmtpSettings {
    pub host: String,
    #[serde(default = "default_smtp_port")]
    pub port: u16,
    /// The sender address, e.g. `shop@example.com`.
    pub from: String,
    /// Customers are known by id: mail goes to `<id>@<recipient_domain>`.
    pub recipient_domain: String,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_smtp_port() -> u16 {
    25
}

/// Sends each notification as a plain-text email over SMTP (no TLS in this build:
/// use a relay on the same host or a private network).
pub struct SmtpSender {
    from: lettre::message::Mailbox,
    recipient_domain: String,
    transport: lettre::SmtpTransport,
}

impl SmtpSender {
    pub fn new(settings: &SmtpSettings) -> anyhow::Result<Self> {
        let transport = lettre::SmtpTransport::builder_dangerous(&settings.host)
            .port(settings.port)
            .timeout(Some(Duration::from_millis(settings.timeout_ms.max(1))))
            .build();
        Ok(Self {
            from: settings.from.parse()?,
            recipient_domain: settings.recipient_domain.clone(),
            transport,
        })
    }
}

impl Sender for SmtpSender {
    fn channel(&self) -> &'static str {
        "smtp"
    }

    fn send(&self, message: &Message) -> Result<(), SendError> {
        use lettre::Transport;
        let to: lettre::message::Mailbox =
            format!("{}@{}", message.customer_id, self.recipient_domain)
                .parse()
                .map_err(|e| {
                    SendError::Refused(format!(
                        "no usable address for {}: {e}",
                        message.customer_id
                    ))
                })?;
        let email = lettre::Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(&message.subject)
            .message_id(Some(format!("<{}@colony>", message.id)))
            .body(message.body.clone())
            .map_err(|e| SendError::Refused(e.to_string()))?;
        match self.transport.send(&email) {
            Ok(_) => Ok(()),
            Err(e) if e.is_permanent() => Err(SendError::Refused(e.to_string())),
            Err(e) => Err(SendError::Transient(e.to_string())),
        }
    }
}

/// `modules.notification.webhook` settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSettings {
    pub url: String,
    /// Key of the `X-Colony-Signature: sha256=<hex>` HMAC over the body.
    pub secret: String,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_timeout_ms() -> u64 {
    5_000
}

/// POSTs each notification as JSON, signed with HMAC-SHA256.
pub struct WebhookSender {
    url: String,
    secret: Vec<u8>,
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
}

/// The signature header value of `body` under `secret`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC takes any key"));
    mac.update(body);
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256={hex}")
}

impl WebhookSender {
    pub fn new(
        settings: &WebhookSettings,
        runtime: tokio::runtime::Handle,
    ) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(settings.timeout_ms.max(1)))
            .build()?;
        Ok(Self {
            url: settings.url.clone(),
            secret: settings.secret.as_bytes().to_vec(),
            client,
            runtime,
        })
    }
}

impl Sender for WebhookSender {
    fn channel(&self) -> &'static str {
        "webhook"
    }

    fn send(&self, message: &Message) -> Result<(), SendError> {
        let body = serde_json::to_vec(message).map_err(|e| SendError::Refused(e.to_string()))?;
        let request = self
            .client
            .post(&self.url)
            .header("Content-Type", "application/json")
            .header("X-Colony-Signature", signature(&self.secret, &body))
            .header("Idempotency-Key", &message.id)
            .body(body);
        let status = self
            .runtime
            .block_on(request.send())
            .map_err(|e| SendError::Transient(e.to_string()))?
            .status();
        if status.is_success() {
            Ok(())
        } else if status.is_client_error() && status.as_u16() != 408 && status.as_u16() != 429 {
            Err(SendError::Refused(format!("the webhook answered {status}")))
        } else {
            Err(SendError::Transient(format!(
                "the webhook answered {status}"
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hmac_sha256_of_the_body() {
        // RFC 4231 test case 2.
        let sig = signature(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            sig,
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}

//! What a request carries into the work it causes: its correlation id and trace.

use std::future::{Ready, ready};

use actix_web::{FromRequest, HttpMessage, HttpRequest, dev::Payload};
use uuid::Uuid;

use crate::outbox::Publisher;
use crate::trace::TraceContext;

/// Set on each request by the server's tracing middleware.
#[derive(Debug, Clone, Copy)]
pub struct RequestContext {
    pub correlation_id: Uuid,
    pub trace: TraceContext,
}

impl RequestContext {
    /// A publisher for `module` whose events continue this request's trace.
    pub fn publisher(&self, module: &'static str) -> Publisher {
        Publisher::new(module, self.correlation_id, Some(self.trace))
    }
}

impl FromRequest for RequestContext {
    type Error = actix_web::Error;
    type Future = Ready<Result<Self, actix_web::Error>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let ctx = req.extensions().get::<RequestContext>().copied();
        ready(Ok(ctx.unwrap_or_else(|| RequestContext {
            correlation_id: Uuid::now_v7(),
            trace: TraceContext::new_root(),
        })))
    }
}

//! Admin HTTP endpoints: `/readyz`, `/healthz`, `/metrics` (Prometheus text format 0.0.4, or
//! OpenMetrics when the scraper's `Accept` asks for `application/openmetrics-text`) and
//! `/monitor` (the live decision stream of `passthrough monitor`: JSON lines, filtered by the
//! query string, see [`crate::monitor`]), served with hyper.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::{
    Method, Request, Response, StatusCode, body::Incoming, server::conn::http1, service::service_fn,
};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// State the endpoints report; shared with the agent loop.
#[derive(Debug, Default)]
pub struct AdminState {
    /// Programs attached and a policy applied.
    pub ready: AtomicBool,
    /// The policy generation in force.
    pub generation: AtomicU64,
    /// What `/metrics` renders; `None` = 404.
    pub metrics: Option<Arc<crate::metrics::Metrics>>,
    /// The decision stream `/monitor` serves; `None` = 404.
    pub monitor: Option<Arc<crate::monitor::Monitor>>,
    /// Why the agent is not ready although enforcing (Kubernetes mode: the API server is
    /// unreachable and the last good state stays in force); `/readyz` answers 503 with it.
    pub degraded: std::sync::RwLock<Option<String>>,
}

fn reply(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// A response body: a whole text, or the monitor's stream.
type AdminBody = Either<Full<Bytes>, crate::monitor::ChannelBody>;

fn route(state: &AdminState, req: &Request<Incoming>) -> Response<AdminBody> {
    if req.method() == Method::GET && req.uri().path() == "/monitor" {
        let Some(m) = &state.monitor else {
            return reply(StatusCode::NOT_FOUND, "the monitor is not enabled\n".into())
                .map(Either::Left);
        };
        return match crate::monitor::Filter::from_query(req.uri().query().unwrap_or("")) {
            Ok(filter) => {
                let mut r = Response::new(Either::Right(crate::monitor::watch(m, filter)));
                r.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static("application/x-ndjson"),
                );
                r
            }
            Err(e) => reply(StatusCode::BAD_REQUEST, format!("{e}\n")).map(Either::Left),
        };
    }
    route_text(state, req).map(Either::Left)
}

fn route_text(state: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into());
    }
    match req.uri().path() {
        "/healthz" => reply(StatusCode::OK, "ok\n".into()),
        "/readyz" => {
            let generation = state.generation.load(Ordering::Acquire);
            let degraded = state
                .degraded
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            if let Some(why) = degraded {
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {why} (enforcing generation={generation})\n"),
                )
            } else if state.ready.load(Ordering::Acquire) {
                reply(StatusCode::OK, format!("ready generation={generation}\n"))
            } else {
                reply(StatusCode::SERVICE_UNAVAILABLE, "not ready\n".into())
            }
        }
        "/metrics" => match &state.metrics {
            Some(m) => {
                let accept = req
                    .headers()
                    .get(hyper::header::ACCEPT)
                    .and_then(|v| v.to_str().ok());
                let (content_type, body) = m.render_for(accept);
                let mut r = reply(StatusCode::OK, body);
                r.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static(content_type),
                );
                r
            }
            None => reply(StatusCode::NOT_FOUND, "metrics are not enabled\n".into()),
        },
        _ => reply(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

/// Binds the admin address (so a bad address fails at start-up) and returns the serving task.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves until the task is dropped.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&state, &req)) }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

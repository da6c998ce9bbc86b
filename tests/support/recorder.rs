//! A recording reverse proxy in front of the gateway: what a real client (Codex CLI) sent it,
//! and the status and headers it got back. Bodies are passed through as they stream, so a
//! streamed answer reaches the client event by event, as it would from the gateway.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::TryStreamExt;
use http::{HeaderMap, Request, Response};
use http_body_util::{combinators::BoxBody, BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// One request and the head of its answer.
#[derive(Clone, Debug)]
pub struct Exchange {
    pub method: http::Method,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub status: u16,
    pub response_headers: HeaderMap,
}

impl Exchange {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

pub struct Recorder {
    /// `http://127.0.0.1:PORT`
    pub url: String,
    exchanges: Arc<Mutex<Vec<Exchange>>>,
    task: JoinHandle<()>,
}

type ProxyBody = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

impl Recorder {
    /// Proxies to `target` (`http://HOST:PORT`) from an ephemeral port of 127.0.0.1.
    pub async fn start(target: &str) -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let exchanges = Arc::new(Mutex::new(Vec::new()));
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        let (target, log) = (target.to_string(), exchanges.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let (client, target, log) = (client.clone(), target.clone(), log.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        forward(client.clone(), target.clone(), log.clone(), request)
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Recorder { url, exchanges, task }
    }

    /// Every exchange so far, in the order their answers began.
    pub fn exchanges(&self) -> Vec<Exchange> {
        self.exchanges.lock().unwrap().clone()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn forward(
    client: reqwest::Client,
    target: String,
    log: Arc<Mutex<Vec<Exchange>>>,
    request: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let (parts, body) = request.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    let mut headers = parts.headers.clone();
    for hop in [http::header::HOST, http::header::CONTENT_LENGTH, http::header::TRANSFER_ENCODING] {
        headers.remove(hop);
    }
    let sent = client
        .request(parts.method.clone(), format!("{target}{path}"))
        .headers(headers)
        .body(body.clone())
        .send()
        .await;
    let answer = match sent {
        Ok(answer) => answer,
        Err(err) => {
            let body = Bytes::from(format!("recorder: the gateway did not answer: {err}"));
            let body = http_body_util::Full::new(body).map_err(|e| match e {}).boxed();
            return Ok(Response::builder().status(502).body(body).unwrap());
        }
    };
    let mut response_headers = answer.headers().clone();
    response_headers.remove(http::header::TRANSFER_ENCODING);
    log.lock().unwrap().push(Exchange {
        method: parts.method,
        path,
        headers: parts.headers,
        body,
        status: answer.status().as_u16(),
        response_headers: response_headers.clone(),
    });
    let mut response = Response::builder().status(answer.status());
    *response.headers_mut().unwrap() = response_headers;
    let frames = answer.bytes_stream().map_ok(Frame::data).map_err(|e| Box::new(e) as _);
    Ok(response.body(BodyExt::boxed(StreamBody::new(frames))).unwrap())
}

//! The HTTP routes: the OpenAI Images API, `/v1/generate`, `/health` and `/metrics`, the
//! API-key check and the request log.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::multipart::{Multipart, MultipartRejection};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use flux2_klein::pipeline::Generated;
use subtle::ConstantTimeEq;
use tokio::sync::oneshot;

use super::api::{self, ApiError, ImageParams, Output, Prepared, Upload};
use super::queue::{Job, Refused};
use super::Shared;

/// The most form fields an edit may have (text fields and files together): more is not a
/// request anyone means.
const MAX_FORM_FIELDS: usize = 64;

pub fn router(shared: Arc<Shared>) -> Router {
    let max_body = shared.config.max_body_mib as usize * (1 << 20);
    let v1 = Router::new()
        .route("/v1/images/generations", post(generations))
        .route("/v1/images/edits", post(edits))
        .route("/v1/generate", post(generate))
        .route("/v1/models", get(models))
        .route_layer(middleware::from_fn_with_state(shared.clone(), authorize));
    Router::new()
        .merge(v1)
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(middleware::from_fn_with_state(shared.clone(), log_request))
        .with_state(shared)
}

/// `Authorization: Bearer KEY` on the /v1 routes when the server has a key. The key given
/// and the server's are compared as SHA-256 digests in constant time: neither the time nor
/// the length of the comparison tells how much of a guess was right.
async fn authorize(State(shared): State<Arc<Shared>>, request: Request, next: Next) -> Response {
    if let Some(digest) = &shared.key_sha256 {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, key) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
            });
        let Some(given) = given else {
            return ApiError::unauthorized(
                "this server needs an API key: send the header \"Authorization: Bearer KEY\"",
            )
            .into_response();
        };
        let ok: bool = super::sha256(given.as_bytes()).ct_eq(digest).into();
        if !ok {
            return ApiError::unauthorized("the API key is not this server's").into_response();
        }
    }
    next.run(request).await
}

/// One line per request on stderr (the probes' only when they fail), and the error counts.
async fn log_request(State(shared): State<Arc<Shared>>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let (method, path) = (request.method().clone(), request.uri().path().to_string());
    let response = next.run(request).await;
    let status = response.status();
    if let Some(kind) = error_kind(status) {
        shared.metrics.error(kind);
    }
    let probe = path == "/health" || path == "/metrics";
    if !probe || !status.is_success() {
        (shared.log)(&format!(
            "{method} {path} {} {:.3} s",
            status.as_u16(),
            started.elapsed().as_secs_f64()
        ));
    }
    response
}

/// The `errors_total` kind of an error status.
fn error_kind(status: StatusCode) -> Option<&'static str> {
    Some(match status {
        s if s.is_success() => return None,
        StatusCode::UNAUTHORIZED => "unauthorized",
        StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED => "not_found",
        StatusCode::PAYLOAD_TOO_LARGE => "too_large",
        StatusCode::TOO_MANY_REQUESTS => "queue_full",
        StatusCode::SERVICE_UNAVAILABLE => "shutting_down",
        s if s.is_server_error() => "server_error",
        _ => "bad_request",
    })
}

async fn not_found(request: Request) -> ApiError {
    ApiError::not_found(format!(
        "no route {} — the routes are POST /v1/images/generations, POST /v1/images/edits, \
         POST /v1/generate, GET /v1/models, GET /health and GET /metrics",
        request.uri().path()
    ))
}

async fn method_not_allowed(request: Request) -> ApiError {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        code: Some("method_not_allowed"),
        ..ApiError::not_found(format!(
            "{} does not take {}",
            request.uri().path(),
            request.method()
        ))
    }
}

async fn health(State(shared): State<Arc<Shared>>) -> Response {
    let (status, text) = if shared.shutting_down.load(Ordering::Relaxed) {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down")
    } else if shared.metrics.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "loading")
    };
    (status, Json(serde_json::json!({ "status": text }))).into_response()
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    let text = shared.metrics.render(shared.queue.depth());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn models(State(shared): State<Arc<Shared>>) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "object": "list",
        "data": [{
            "id": shared.config.model_id,
            "object": "model",
            "created": shared.started,
            "owned_by": "flux2-klein",
        }],
    }))
}

/// A body the extractor could not read: 413 past the limit, else 400.
fn body_rejection(status: StatusCode, text: String, shared: &Shared) -> ApiError {
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::too_large(shared.config.max_body_mib)
    } else {
        ApiError::bad(None, format!("cannot read the request body: {text}"))
    }
}

async fn generations(
    State(shared): State<Arc<Shared>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let body = body.map_err(|e| body_rejection(e.status(), e.body_text(), &shared))?;
    let params = ImageParams::from_json(&body)?;
    let (images, output) = run(&shared, started, move |c| {
        api::prepare_generation(params, c)
    })
    .await?;
    Ok(openai_response(images, output))
}

async fn edits(
    State(shared): State<Arc<Shared>>,
    form: Result<Multipart, MultipartRejection>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let mut form = form.map_err(|e| body_rejection(e.status(), e.body_text(), &shared))?;
    let (mut fields, mut images, mut mask) = (Vec::new(), Vec::new(), None);
    let mut count = 0;
    loop {
        let field = form
            .next_field()
            .await
            .map_err(|e| body_rejection(e.status(), e.body_text(), &shared))?;
        let Some(field) = field else { break };
        count += 1;
        if count > MAX_FORM_FIELDS {
            return Err(ApiError::bad(
                None,
                format!("more than {MAX_FORM_FIELDS} form fields"),
            ));
        }
        let name = field.name().unwrap_or_default().to_string();
        let file_name = field.file_name().map(str::to_string);
        let bytes = field
            .bytes()
            .await
            .map_err(|e| body_rejection(e.status(), e.body_text(), &shared))?;
        match name.as_str() {
            "image" | "image[]" => images.push(Upload { file_name, bytes }),
            "mask" => mask = Some(Upload { file_name, bytes }),
            _ => {
                let text = String::from_utf8(bytes.to_vec()).map_err(|_| {
                    ApiError::bad(
                        Some(&name),
                        format!("the form field \"{name}\" is not UTF-8 text"),
                    )
                })?;
                fields.push((name, text));
            }
        }
    }
    let params = ImageParams::from_form(fields)?;
    let prepare = move |c: &api::Config| api::prepare_edit(params, images, mask, c);
    let (images, output) = run(&shared, started, prepare).await?;
    Ok(openai_response(images, output))
}

/// `POST /v1/generate`: a prompt-file line in; the image (PNG with the CLI's metadata, or
/// the format `Accept` asks for) out, or with `Accept: application/json` the generations
/// route's JSON.
async fn generate(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let body = body.map_err(|e| body_rejection(e.status(), e.body_text(), &shared))?;
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let json = accept.contains("application/json");
    let format = if accept.contains("image/jpeg") {
        "jpeg"
    } else if accept.contains("image/webp") {
        "webp"
    } else {
        "png"
    };
    let output = api::output(Some(format), None, None)?;
    let line = String::from_utf8(body.to_vec())
        .map_err(|_| ApiError::bad(None, "the body is not UTF-8 text"))?;
    let (images, output) = run(&shared, started, move |c| {
        api::prepare_line(&line, output, c)
    })
    .await?;
    Ok(if json {
        openai_response(images, output)
    } else {
        let (bytes, _) = images.into_iter().next().expect("one image");
        ([(header::CONTENT_TYPE, output.mime())], bytes).into_response()
    })
}

/// An image request from its arrival (`started`) to its images: checks and decodes it
/// (`prepare`, off the async threads), queues its images, waits for them, encodes them with
/// the metadata the CLI records and records the latency. Each image's bytes and what made
/// it, and how they are to be sent.
async fn run(
    shared: &Arc<Shared>,
    started: Instant,
    prepare: impl FnOnce(&api::Config) -> Result<Prepared, ApiError> + Send + 'static,
) -> Result<(Vec<(Vec<u8>, Generated)>, Output), ApiError> {
    let s = shared.clone();
    let prepared = blocking(move || prepare(&s.config)).await?;
    let output = prepared.output;
    let (reply, answer) = oneshot::channel();
    let job = Job {
        requests: prepared.requests.clone(),
        reply,
    };
    shared
        .queue
        .push(job, shared.metrics.mean_latency())
        .map_err(|refused| match refused {
            Refused::Full { retry_after } => ApiError::queue_full(retry_after),
            Refused::Closed => ApiError::shutting_down(),
        })?;
    let generated = match answer.await {
        Ok(reply) => reply?,
        // The worker dropped the job unanswered: it panicked on it (a bug, logged).
        Err(_) => {
            return Err(ApiError::server(
                "internal error while generating (logged by the server) — this is a bug in \
                 flux2-klein; please report it",
            ))
        }
    };
    let s = shared.clone();
    let encoded = blocking(move || {
        let hash = |name: &str| prepared.hashes.get(name).cloned().unwrap_or_default();
        let encoded = prepared
            .requests
            .iter()
            .zip(generated)
            .map(|(request, g)| {
                let recorded = s.run_info.recorded(request, &g, &hash);
                let bytes = flux2_klein::image_io::encode_image(
                    &g.image,
                    output.format,
                    &recorded.to_text_chunks(),
                    output.jpeg_quality,
                    "the response image",
                )
                .map_err(|e| ApiError::server(super::super::error_line(&e)))?;
                Ok((bytes, g))
            })
            .collect();
        for w in flux2_klein::ops::take_warnings() {
            (s.log)(&format!("warning: {w}"));
        }
        encoded
    })
    .await?;
    shared.metrics.observe(started.elapsed());
    Ok((encoded, output))
}

/// The Images API's answer: `{created, data: [{b64_json | url, seed}], output_format, size}`.
fn openai_response(images: Vec<(Vec<u8>, Generated)>, output: Output) -> Response {
    let b64 = base64::engine::general_purpose::STANDARD;
    let size = images
        .first()
        .map(|(_, g)| format!("{}x{}", g.width, g.height));
    let data: Vec<_> = images
        .iter()
        .map(|(bytes, g)| {
            let encoded = b64.encode(bytes);
            if output.as_url {
                serde_json::json!({
                    "url": format!("data:{};base64,{encoded}", output.mime()),
                    "seed": g.seed,
                })
            } else {
                serde_json::json!({ "b64_json": encoded, "seed": g.seed })
            }
        })
        .collect();
    Json(serde_json::json!({
        "created": super::unix_now(),
        "data": data,
        "output_format": output.name(),
        "size": size,
    }))
    .into_response()
}

/// CPU work (decoding uploads, encoding images) off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(ApiError::server(format!("internal error: {e}"))))
}

//! `flux2-klein serve`: the models stay loaded and warm behind an HTTP server. The OpenAI
//! Images API (`/v1/images/generations`, `/v1/images/edits`, `/v1/models`) for the tools
//! that speak it, `/v1/generate` (a prompt-file line in, the image with its metadata out),
//! `/health` for readiness probes and `/metrics` for Prometheus.
//!
//! One device worker thread owns the pipeline and runs the queued requests in batches
//! (`queue`); the HTTP side (axum on tokio) checks each request before it is queued (`api`)
//! and encodes the images it gets back (`routes`). A request gives the pixels the CLI gives
//! for the same settings and seeds: both build the same `Request`s.
//!
//! SIGINT/SIGTERM: stop accepting, answer the requests that have not started with 503,
//! finish the running batch, exit 0; a second signal exits at once.

mod api;
mod metrics;
mod queue;
mod routes;

use std::future::IntoFuture;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use flux2_klein::pipeline::Request;
use sha2::Digest;

use super::args::ServeArgs;
use super::common::{load_pipeline, print_stdout, Adapters};
use super::device::pipeline_options;
use super::generate::RunInfo;
use super::progress::{Reporter, Verbosity};

/// What the handlers and the worker share.
pub struct Shared {
    config: api::Config,
    queue: queue::Queue,
    metrics: metrics::Metrics,
    /// What every image's metadata records about the model and device.
    run_info: RunInfo,
    /// SHA-256 of `--api-key`; `None`: no key needed.
    key_sha256: Option<[u8; 32]>,
    shutting_down: AtomicBool,
    /// Unix time the server started (`/v1/models`' `created`).
    started: u64,
    /// A line on stderr (request lines hidden by `--quiet`; warnings and errors never).
    log: Box<dyn Fn(&str) + Send + Sync>,
}

/// Seconds since the Unix epoch (OpenAI's `created`).
fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    sha2::Sha256::digest(bytes).into()
}

/// How long the answers of the last batch may take to be written after it finished, at
/// shutdown, before the process exits anyway (a client that stopped reading must not hold
/// the process).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

pub fn run(args: &ServeArgs, reporter: &mut Reporter) -> Result<()> {
    // --- Cheap checks, before any weights are touched. ---
    let address = resolve_address(&args.host, args.port)?;
    let key = args.api_key.as_deref();
    if key.is_some_and(|k| k.trim().is_empty()) {
        bail!("--api-key (or FLUX2_KLEIN_API_KEY) is empty — give a key, or leave it unset");
    }
    if !address.ip().is_loopback() && key.is_none() && !args.insecure_no_auth {
        bail!(
            "--host {} is reachable from other machines, and anyone who reaches it could use \
             the GPU: give an API key with --api-key KEY (or FLUX2_KLEIN_API_KEY), or pass \
             --insecure-no-auth to serve without one",
            args.host
        );
    }

    // --- Model. ---
    let options = pipeline_options(&args.model, true)?;
    let mut pipeline = load_pipeline(&args.model, &args.sampling, options, reporter)?;
    let adapters = Adapters::load(&pipeline, &args.sampling.loras, reporter)?;
    let run_info = RunInfo::of(
        &pipeline,
        args.model.transformer.as_deref(),
        flux2_klein::image_io::JPEG_QUALITY,
    )?;
    let config = api::Config {
        max_n: args.max_n,
        max_area: args.sampling.max_area_px(),
        steps: args.sampling.steps,
        guidance: args.sampling.guidance,
        adapters: adapters.applied(&args.sampling.loras),
        model_id: pipeline.model.id.clone(),
        max_body_mib: args.max_body_mib,
    };
    // The models load and the kernels warm up on a small image before /health says ready.
    let warmup = Request {
        width: Some(64),
        height: Some(64),
        steps: Some(1),
        adapters: config.adapters.clone(),
        ..Request::new("warm-up", 0)
    };

    let quiet = reporter.verbosity() == Verbosity::Quiet;
    let shared = Arc::new(Shared {
        config,
        queue: queue::Queue::new(args.max_queue as usize),
        metrics: metrics::Metrics::default(),
        run_info,
        key_sha256: key.map(|k| sha256(k.as_bytes())),
        shutting_down: AtomicBool::new(false),
        started: unix_now(),
        log: Box::new(move |line: &str| {
            if !quiet || line.starts_with("warning:") || line.starts_with("error:") {
                super::log_line(line);
            }
        }),
    });

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the server's threads")?;
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(address))
        .map_err(|e| {
            anyhow!(
                "cannot listen on {address}: {e} — pick another --port (0 lets the system \
                 choose one) or --host"
            )
        })?;
    let bound = listener.local_addr()?;
    print_stdout(&format!("listening on http://{bound}\n"))?;
    reporter.info("loading the models and warming up (GET /health is 503 until ready)");

    // --- The device worker. ---
    let (worker_done, worker_ended) = tokio::sync::oneshot::channel::<()>();
    let worker = {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("device worker".into())
            .spawn(move || {
                let result = queue::work(
                    &mut pipeline,
                    &shared.queue,
                    &shared.metrics,
                    &warmup,
                    &*shared.log,
                );
                let _ = worker_done.send(());
                result
            })
            .context("cannot start the device worker thread")?
    };

    // --- Serve until a signal (or the worker's end). ---
    let app = routes::router(shared.clone());
    runtime.block_on(async move {
        let stop = Arc::new(tokio::sync::Notify::new());
        let stopped = stop.clone();
        let server = tokio::spawn(
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { stopped.notified().await })
                .into_future(),
        );
        tokio::select! {
            () = signal() => {}
            _ = worker_ended => {}
        }
        shared.shutting_down.store(true, Ordering::Relaxed);
        stop.notify_one();
        for job in shared.queue.close() {
            let _ = job.reply.send(Err(api::ApiError::shutting_down()));
        }
        (shared.log)("shutting down: finishing the running requests (a second signal exits now)");
        tokio::spawn(async {
            signal().await;
            super::log_line("second signal: exiting now");
            std::process::exit(130);
        });
        let worker = tokio::task::spawn_blocking(move || worker.join()).await;
        let _ = tokio::time::timeout(DRAIN_TIMEOUT, server).await;
        match worker {
            Ok(Ok(result)) => result,
            _ => bail!("the device worker stopped unexpectedly"),
        }
    })?;
    // The runtime's blocking threads (an encode of a request nobody waits for) do not hold
    // the exit.
    runtime.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}

/// `--host` and `--port` as the address to bind (the first the host resolves to).
fn resolve_address(host: &str, port: u16) -> Result<SocketAddr> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    (bare, port)
        .to_socket_addrs()
        .map_err(|e| anyhow!("--host {host}: {e} — give an IP address or a host name"))?
        .next()
        .ok_or_else(|| anyhow!("--host {host} resolves to no address — give an IP address"))
}

/// SIGINT or SIGTERM.
async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_resolve() {
        assert!(resolve_address("127.0.0.1", 0).unwrap().ip().is_loopback());
        assert!(resolve_address("[::1]", 0).unwrap().ip().is_loopback());
        assert!(!resolve_address("0.0.0.0", 7860).unwrap().ip().is_loopback());
        assert!(resolve_address("no such host.invalid", 0).is_err());
    }
}

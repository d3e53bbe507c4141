//! The bounded queue between the HTTP handlers and the one device worker, and the worker: it
//! owns the pipeline, takes the waiting requests in batches and answers each request as soon
//! as its last image is decoded.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use flux2_klein::pipeline::{Event, Generated, Pipeline, Request, BATCH_CHUNK};
use tokio::sync::oneshot;

use super::api::ApiError;
use super::metrics::Metrics;

/// What a job's handler gets back: its images in order, or why there are none.
pub type Reply = Result<Vec<Generated>, ApiError>;

/// One HTTP request's images, waiting for the device.
pub struct Job {
    pub requests: Vec<Request>,
    pub reply: oneshot::Sender<Reply>,
}

/// Why a job was not queued.
pub enum Refused {
    /// `--max-queue` jobs wait already; retry after about this long.
    Full { retry_after: Duration },
    /// The server is shutting down.
    Closed,
}

#[derive(Default)]
struct State {
    jobs: VecDeque<Job>,
    closed: bool,
}

pub struct Queue {
    state: Mutex<State>,
    wake: Condvar,
    max: usize,
}

impl Queue {
    pub fn new(max: usize) -> Self {
        Self {
            state: Mutex::default(),
            wake: Condvar::new(),
            max,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The jobs waiting (not those running).
    pub fn depth(&self) -> usize {
        self.lock().jobs.len()
    }

    /// Queues `job`, or says why not. `mean` (the mean latency so far) sizes Retry-After: the
    /// time the jobs ahead will take.
    pub fn push(&self, job: Job, mean: Option<Duration>) -> Result<(), Refused> {
        let mut state = self.lock();
        if state.closed {
            return Err(Refused::Closed);
        }
        if state.jobs.len() >= self.max {
            let per_job = mean.unwrap_or(Duration::from_secs(1));
            let wait = per_job.saturating_mul(state.jobs.len() as u32 + 1);
            return Err(Refused::Full {
                retry_after: wait.max(Duration::from_secs(1)),
            });
        }
        state.jobs.push_back(job);
        drop(state);
        self.wake.notify_one();
        Ok(())
    }

    /// Stops queueing and hands back the jobs that had not started (to be answered 503).
    pub fn close(&self) -> Vec<Job> {
        let mut state = self.lock();
        state.closed = true;
        let jobs = state.jobs.drain(..).collect();
        drop(state);
        self.wake.notify_all();
        jobs
    }

    /// Waits for jobs and takes the next batch: the oldest job, and those after it while the
    /// batch holds at most [`BATCH_CHUNK`] images (one job of more images runs alone). Jobs
    /// whose client went away are dropped here, before any work. `None` once the queue is
    /// closed.
    fn take_batch(&self, metrics: &Metrics) -> Option<Vec<Job>> {
        let mut state = self.lock();
        loop {
            if state.closed {
                return None;
            }
            let mut batch: Vec<Job> = Vec::new();
            let mut images = 0;
            while let Some(job) = state.jobs.front() {
                if job.reply.is_closed() {
                    state.jobs.pop_front();
                    metrics.error("client_gone");
                    continue;
                }
                if !batch.is_empty() && images + job.requests.len() > BATCH_CHUNK {
                    break;
                }
                images += job.requests.len();
                batch.extend(state.jobs.pop_front());
            }
            if !batch.is_empty() {
                // Counted before the lock is released: a /metrics reader never sees the job
                // neither waiting nor running.
                metrics.running.store(batch.len() as u64, Ordering::Relaxed);
                return Some(batch);
            }
            state = self.wake.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// The device worker: runs `warmup` (the models load and the first kernels compile before
/// /health says ready), then batch after batch until the queue closes.
pub fn work(
    pipeline: &mut Pipeline,
    queue: &Queue,
    metrics: &Metrics,
    warmup: &Request,
    log: &dyn Fn(&str),
) -> anyhow::Result<()> {
    pipeline.generate(warmup, &mut |e| log_event(e, log))?;
    metrics.ready.store(true, Ordering::Relaxed);
    log("ready");
    while let Some(batch) = queue.take_batch(metrics) {
        // A panic is a bug (the hook has logged it); its jobs' handlers see their answers
        // dropped and answer 500, and the server goes on with the next batch.
        let run = std::panic::AssertUnwindSafe(|| run_batch(pipeline, batch, metrics, log));
        let _ = std::panic::catch_unwind(run);
        metrics.running.store(0, Ordering::Relaxed);
    }
    Ok(())
}

/// The pipeline's warnings go to the log; its progress does not (many requests interleave).
fn log_event(event: Event, log: &dyn Fn(&str)) {
    if let Event::Warning(w) = event {
        log(&format!("warning: {w}"));
    }
}

/// Runs the jobs' images as one `generate_batch` and answers each job when its last image
/// arrives. When the batch fails, the jobs not answered yet run again one by one, so that
/// one bad request cannot fail the others.
fn run_batch(pipeline: &mut Pipeline, jobs: Vec<Job>, metrics: &Metrics, log: &dyn Fn(&str)) {
    let requests: Vec<Request> = jobs.iter().flat_map(|j| j.requests.clone()).collect();
    let mut images: Vec<Vec<Option<Generated>>> =
        jobs.iter().map(|j| vec![None; j.requests.len()]).collect();
    // Each job's first image (its images follow in order).
    let first: Vec<usize> = jobs
        .iter()
        .scan(0, |start, j| {
            let s = *start;
            *start += j.requests.len();
            Some(s)
        })
        .collect();
    let mut replies: Vec<Option<oneshot::Sender<Reply>>> = Vec::with_capacity(jobs.len());
    let mut job_requests = Vec::with_capacity(jobs.len());
    for job in jobs {
        replies.push(Some(job.reply));
        job_requests.push(job.requests);
    }
    let result = pipeline.generate_batch(
        &requests,
        &mut |e| log_event(e, log),
        &mut |i, generated| {
            let j = first.partition_point(|&f| f <= i) - 1;
            images[j][i - first[j]] = Some(generated);
            metrics.images.fetch_add(1, Ordering::Relaxed);
            if images[j].iter().all(Option::is_some) {
                let done = images[j].iter_mut().map(|g| g.take().unwrap()).collect();
                if let Some(reply) = replies[j].take() {
                    // A client that went away meanwhile: nobody to answer.
                    let _ = reply.send(Ok(done));
                }
            }
            Ok(())
        },
    );
    let Err(e) = result else { return };
    let unanswered: Vec<usize> = (0..replies.len())
        .filter(|&j| replies[j].is_some())
        .collect();
    if unanswered.len() == 1 || replies.len() == 1 {
        let message = super::super::error_line(&e);
        log(&format!("error: {message}"));
        for j in unanswered {
            let _ = replies[j]
                .take()
                .unwrap()
                .send(Err(ApiError::server(message.clone())));
        }
        return;
    }
    for j in unanswered {
        let job = Job {
            requests: std::mem::take(&mut job_requests[j]),
            reply: replies[j].take().unwrap(),
        };
        run_batch(pipeline, vec![job], metrics, log);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(images: usize) -> (Job, oneshot::Receiver<Reply>) {
        let (reply, rx) = oneshot::channel();
        let requests = (0..images).map(|i| Request::new("x", i as u64)).collect();
        (Job { requests, reply }, rx)
    }

    #[test]
    fn batches_fill_up_to_a_chunk_and_skip_gone_clients() {
        let queue = Queue::new(8);
        let metrics = Metrics::default();
        let (a, _ra) = job(10);
        let (b, rb) = job(3);
        let (c, _rc) = job(4);
        let (d, _rd) = job(2);
        for j in [a, b, c, d] {
            assert!(queue.push(j, None).is_ok());
        }
        // b's client went away: dropped, and the batch goes on with c, then stops before d
        // would take it past BATCH_CHUNK (10 + 4 + 2 = 16 fits; the test chunk is 16).
        drop(rb);
        let batch = queue.take_batch(&metrics).unwrap();
        let sizes: Vec<usize> = batch.iter().map(|j| j.requests.len()).collect();
        assert_eq!(sizes, [10, 4, 2]);
        assert!(metrics.render(0).contains("kind=\"client_gone\"} 1"));
        assert_eq!(queue.depth(), 0);
    }

    #[test]
    fn a_full_queue_refuses_with_a_wait() {
        let queue = Queue::new(1);
        let (a, _ra) = job(1);
        let (b, _rb) = job(1);
        assert!(queue.push(a, None).is_ok());
        match queue.push(b, Some(Duration::from_secs(3))) {
            Err(Refused::Full { retry_after }) => assert_eq!(retry_after, Duration::from_secs(6)),
            _ => panic!("a full queue must refuse"),
        }
        let waiting = queue.close();
        assert_eq!(waiting.len(), 1);
        let (c, _rc) = job(1);
        assert!(matches!(queue.push(c, None), Err(Refused::Closed)));
        assert!(queue.take_batch(&Metrics::default()).is_none());
    }
}

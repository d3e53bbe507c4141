//! What the user sees on stderr while the pipeline runs, driven by `pipeline::Event`s:
//! a live display (spinner per stage, bar for the denoising steps) when stderr is a terminal,
//! plain one-line messages per stage otherwise (CI logs), and only warnings with `--quiet`.
//! stdout is never touched here: it carries the result (output path, bench table).

use std::collections::HashSet;
use std::io::IsTerminal;
use std::time::Duration;

use flux2_klein::pipeline::{Event, Stage};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verbosity {
    Quiet,
    Normal,
    Verbose,
}

/// The stderr reporter.
pub struct Reporter {
    verbosity: Verbosity,
    live: Option<Live>,
    warned: HashSet<String>,
    /// "[3/10] " while a batch reports on its third image, else empty.
    job: String,
}

/// The live display: one bar per running stage.
struct Live {
    multi: MultiProgress,
    bars: Vec<(Stage, ProgressBar)>,
}

impl Reporter {
    /// Live display only when stderr is a terminal that can redraw lines (not `TERM=dumb`)
    /// and not `--quiet`.
    pub fn new(verbosity: Verbosity) -> Self {
        let dumb = std::env::var_os("TERM").is_some_and(|t| t == "dumb");
        let live =
            (verbosity > Verbosity::Quiet && std::io::stderr().is_terminal() && !dumb).then(|| {
                Live {
                    multi: MultiProgress::with_draw_target(ProgressDrawTarget::stderr()),
                    bars: Vec::new(),
                }
            });
        Self {
            verbosity,
            live,
            warned: HashSet::new(),
            job: String::new(),
        }
    }

    /// "[3/10] " while a batch works on its third image, else "".
    pub fn job_prefix(&self) -> &str {
        &self.job
    }

    pub fn verbosity(&self) -> Verbosity {
        self.verbosity
    }

    /// A normal message (hidden by `--quiet`).
    pub fn info(&self, msg: &str) {
        if self.verbosity >= Verbosity::Normal {
            self.print(msg);
        }
    }

    /// A `--verbose` message.
    pub fn detail(&self, msg: &str) {
        if self.verbosity >= Verbosity::Verbose {
            self.print(msg);
        }
    }

    /// A warning: always shown, each distinct text once.
    pub fn warn(&mut self, msg: &str) {
        if self.warned.insert(msg.to_string()) {
            self.print(&format!("warning: {msg}"));
        }
    }

    fn print(&self, line: &str) {
        match &self.live {
            Some(live) => live.multi.suspend(|| super::log_line(line)),
            None => super::log_line(line),
        }
    }

    /// Handles one pipeline event.
    pub fn event(&mut self, event: Event) {
        match event {
            Event::Warning(msg) => self.warn(&msg),
            Event::Profile(report) => self.print(report.trim_end()),
            Event::Job { index, total } => {
                let width = total.to_string().len();
                self.job = format!("[{:width$}/{total}] ", index + 1);
            }
            Event::StageStart(stage) => match &mut self.live {
                Some(live) => {
                    let bar = live.multi.add(ProgressBar::new_spinner());
                    bar.set_style(spinner_style());
                    bar.set_message(format!("{}{stage}", self.job));
                    bar.enable_steady_tick(Duration::from_millis(100));
                    live.bars.push((stage, bar));
                }
                None => self.detail(&format!("{}{stage}…", self.job)),
            },
            Event::StageEnd(stage, took) => {
                if let Some(live) = &mut self.live {
                    if let Some(i) = live.bars.iter().rposition(|(s, _)| *s == stage) {
                        let (_, bar) = live.bars.remove(i);
                        bar.finish_and_clear();
                        live.multi.remove(&bar);
                    }
                }
                self.info(&format!("{}{stage}: {}", self.job, fmt_duration(took)));
            }
            Event::Step {
                index,
                total,
                elapsed,
            } => {
                match &mut self.live {
                    Some(live) => {
                        // The bar of the running "denoise" stage (or of the latest stage).
                        let i = live
                            .bars
                            .iter()
                            .rposition(|(s, _)| *s == Stage::Denoise)
                            .or_else(|| live.bars.len().checked_sub(1));
                        let bar = match i {
                            Some(i) => live.bars[i].1.clone(),
                            None => {
                                let bar = live.multi.add(ProgressBar::new(total as u64));
                                live.bars.push((Stage::Denoise, bar.clone()));
                                bar
                            }
                        };
                        if bar.length() != Some(total as u64) {
                            bar.set_length(total as u64);
                            bar.set_style(steps_style());
                            bar.reset_eta();
                        }
                        bar.set_message(format!(
                            "{}denoise ({}/step)",
                            self.job,
                            fmt_duration(elapsed)
                        ));
                        bar.set_position((index + 1) as u64);
                    }
                    None => self.detail(&format!(
                        "{}step {}/{total}: {}",
                        self.job,
                        index + 1,
                        fmt_duration(elapsed)
                    )),
                }
            }
        }
    }

    /// Clears whatever is still on screen (a stage that never ended because of an error).
    pub fn finish(&mut self) {
        if let Some(live) = &mut self.live {
            for (_, bar) in live.bars.drain(..) {
                bar.finish_and_clear();
            }
            let _ = live.multi.clear();
        }
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        self.finish();
    }
}

fn spinner_style() -> ProgressStyle {
    ProgressStyle::with_template("{spinner} {msg} {elapsed}")
        .expect("valid template")
        .tick_chars("⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏ ")
}

fn steps_style() -> ProgressStyle {
    ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} steps, {elapsed} (eta {eta})")
        .expect("valid template")
        .progress_chars("=> ")
}

/// "850 ms", "1.23 s", "2 min 3.4 s".
pub fn fmt_duration(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 1.0 {
        format!("{:.0} ms", s * 1e3)
    } else if s < 60.0 {
        format!("{s:.2} s")
    } else {
        format!("{} min {:.1} s", (s / 60.0).floor(), s % 60.0)
    }
}

/// "1.50 GiB", "512.0 MiB".
pub fn fmt_bytes(b: u64) -> String {
    let b = b as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", b / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formatting() {
        assert_eq!(fmt_duration(Duration::from_millis(850)), "850 ms");
        assert_eq!(fmt_duration(Duration::from_millis(1234)), "1.23 s");
        assert_eq!(fmt_duration(Duration::from_secs(123)), "2 min 3.0 s");
        assert_eq!(fmt_bytes(3 << 29), "1.50 GiB");
        assert_eq!(fmt_bytes(1 << 20), "1.0 MiB");
    }
}

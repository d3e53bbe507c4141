//! `flux2-klein bench` (in the spirit of llama-bench): the pipeline is loaded once with every
//! component kept resident; per `--size`, `--warmup` untimed runs (the first loads the
//! weights), then `--runs` timed generations. Results go to stdout as a markdown table (mean ± sample standard
//! deviation over the runs) or, with `--json`, as one JSON object with every run.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use std::sync::Arc;

use flux2_klein::image_io::resize_lanczos;
use flux2_klein::model_dir::PipelineKind;
use flux2_klein::pipeline::inpaint::DEFAULT_STRENGTH;
use flux2_klein::pipeline::{Event, Generated, InitImage, Pipeline, Reference, Request, Timings};
use serde_json::json;

use super::args::{BenchArgs, Size};
use super::common::{floor_size, floored, load_pipeline, print_stdout, warn_many_refs};
use super::device::{device_name, dtype_name, pipeline_options};
use super::progress::{fmt_bytes, fmt_duration, Reporter, Verbosity};
use super::references::load_references;

/// One timed generation.
struct Run {
    size: Size,
    run: u32,
    /// The image's index in its run's batch (`--batch`).
    image: u32,
    timings: Timings,
    peak: Option<u64>,
}

/// What every run used: the steps and guidance the pipeline resolved (its defaults unless
/// given).
#[derive(Clone, Copy)]
struct Settings {
    steps: usize,
    guidance: f64,
}

pub fn run(args: &BenchArgs, reporter: &mut Reporter) -> Result<()> {
    // --- Cheap checks. ---
    let references = load_references(&args.refs)?;
    warn_many_refs(references.len(), reporter);
    let mut sizes = Vec::new();
    for &s in &args.sizes {
        // Floored like diffusers (spec §8), so the table shows the size actually made.
        let size = floored("--size", s, floor_size, reporter);
        if !sizes.contains(&size) {
            sizes.push(size);
        }
    }
    let init = load_init(args)?;
    let options = pipeline_options(&args.model, true)?;

    // --- Model, loaded once. ---
    let mut pipeline = load_pipeline(&args.model, &args.sampling, options, reporter)?;
    let adapters = super::common::Adapters::load(&pipeline, &args.sampling.loras, reporter)?
        .applied(&args.sampling.loras);

    // With --init-image the init image (and mask) are resized to each size, which the output
    // then has.
    let request = |size: Size| -> Result<Request> {
        let init = match &init {
            Some((image, mask)) => {
                let resize = |r: &Reference| -> Result<Reference> {
                    let rgb = flux2_klein::image_io::to_rgb_like_pillow(&r.image)?;
                    let rgb = resize_lanczos(&rgb, size.width, size.height)?;
                    Ok(Reference {
                        image: Arc::new(image::DynamicImage::ImageRgb8(rgb)),
                        name: r.name.clone(),
                    })
                };
                let image = resize(image)?;
                Some(InitImage {
                    image: image.image,
                    name: image.name,
                    mask: mask.as_ref().map(resize).transpose()?,
                    strength: args.inpaint.strength.unwrap_or(DEFAULT_STRENGTH),
                    padding_mask_crop: None,
                })
            }
            None => None,
        };
        let sized = init.is_none();
        Ok(Request {
            prompt: args.prompt.clone(),
            negative_prompt: String::new(),
            references: references.clone(),
            width: sized.then_some(size.width as usize),
            height: sized.then_some(size.height as usize),
            steps: args.sampling.steps.map(|s| s as usize),
            guidance: args.sampling.guidance,
            seed: args.seed,
            init,
            adapters: adapters.clone(),
        })
    };
    let verbose = reporter.verbosity() >= Verbosity::Verbose;
    // One run: a batch of `--batch` images with consecutive seeds (their references shared).
    let generate = |pipeline: &mut Pipeline, reporter: &mut Reporter, size: Size| {
        let first = request(size)?;
        let requests: Vec<Request> = (0..u64::from(args.batch))
            .map(|i| Request {
                seed: args.seed.wrapping_add(i),
                ..first.clone()
            })
            .collect();
        let mut images: Vec<Generated> = Vec::with_capacity(requests.len());
        let t = std::time::Instant::now();
        let result = pipeline.generate_batch(
            &requests,
            &mut |e| match e {
                Event::Warning(_) | Event::Profile(_) => reporter.event(e),
                _ if verbose => reporter.event(e),
                _ => {}
            },
            &mut |_, g| {
                images.push(g);
                Ok(())
            },
        );
        reporter.finish();
        result.with_context(|| format!("bench run at {size} failed"))?;
        Ok::<_, anyhow::Error>((images, t.elapsed()))
    };
    let batch_note = if args.batch > 1 {
        format!(" (batch of {})", args.batch)
    } else {
        String::new()
    };

    let mut runs = Vec::new();
    let mut settings = None;
    for &size in &sizes {
        // Warm up every size (first-use kernel compilation, allocator growth), then measure the
        // peak of the timed runs alone (resident weights included).
        for i in 0..args.warmup {
            let (_, took) = generate(&mut pipeline, reporter, size)?;
            reporter.info(&format!(
                "warmup {}/{} at {size}{batch_note}: {}",
                i + 1,
                args.warmup,
                fmt_duration(took)
            ));
        }
        pipeline.reset_peak_device_memory();
        for r in 0..args.runs {
            let (images, took) = generate(&mut pipeline, reporter, size)?;
            reporter.info(&format!(
                "{size} run {}/{}{batch_note}: {}",
                r + 1,
                args.runs,
                fmt_duration(took)
            ));
            let peak = pipeline.peak_device_memory();
            for (i, g) in images.into_iter().enumerate() {
                settings.get_or_insert(Settings {
                    steps: g.steps,
                    guidance: g.guidance,
                });
                runs.push(Run {
                    size: Size {
                        width: g.width as u32,
                        height: g.height as u32,
                    },
                    run: r,
                    image: i as u32,
                    timings: g.timings,
                    peak,
                });
            }
        }
    }

    let Some(settings) = settings else {
        bail!("bench made no timed runs");
    };
    let text = if args.json {
        let v = to_json(args, &pipeline, settings, &sizes, &runs);
        serde_json::to_string_pretty(&v)? + "\n"
    } else {
        table(args, &pipeline, settings, &sizes, &runs)
    };
    print_stdout(&text)
}

/// `--init-image` and `--mask` of a bench, decoded (one line per bad input).
fn load_init(args: &BenchArgs) -> Result<Option<(Reference, Option<Reference>)>> {
    let a = &args.inpaint;
    let Some(init) = &a.init_image else {
        if a.mask.is_some() {
            bail!("--mask needs --init-image (the image whose white mask area is repainted)");
        }
        if a.strength.is_some() {
            bail!("--strength needs --init-image (it sets how much of that image is repainted)");
        }
        if a.padding_mask_crop.is_some() {
            bail!("--padding-mask-crop needs --init-image and --mask");
        }
        return Ok(None);
    };
    if a.padding_mask_crop.is_some() {
        bail!("bench does not take --padding-mask-crop");
    }
    let load = |path: &std::path::Path, what: &str| -> Result<Reference> {
        let name = path.display().to_string();
        let image = flux2_klein::image_io::load_image(path).map_err(|e| {
            anyhow::anyhow!(
                "cannot decode {what} {name} ({}) — use a PNG, JPEG or WebP file",
                e.root_cause()
            )
        })?;
        Ok(Reference {
            image: Arc::new(image),
            name,
        })
    };
    let mask = a.mask.as_deref().map(|m| load(m, "mask")).transpose()?;
    Ok(Some((load(init, "init image")?, mask)))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn mean_step_ms(t: &Timings) -> f64 {
    if t.steps.is_empty() {
        0.0
    } else {
        t.steps.iter().map(|d| ms(*d)).sum::<f64>() / t.steps.len() as f64
    }
}

/// Mean and sample standard deviation.
fn stats(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = if xs.len() > 1 {
        xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

fn runs_of<'a>(runs: &'a [Run], size: &Size) -> Vec<&'a Run> {
    runs.iter().filter(|r| r.size == *size).collect()
}

/// The per-stage quantities of the table and summary, by column.
type Column = (&'static str, fn(&Timings) -> f64);
const COLUMNS: [Column; 6] = [
    ("text_encode_ms", |t| ms(t.text_encode)),
    ("reference_encode_ms", |t| ms(t.reference_encode)),
    // KV checkpoints: the reference pass (0 otherwise).
    ("reference_kv_ms", |t| ms(t.reference_kv)),
    ("mean_step_ms", mean_step_ms),
    ("vae_decode_ms", |t| ms(t.vae_decode)),
    ("total_ms", |t| ms(t.total)),
];

fn header(args: &BenchArgs, pipeline: &Pipeline, settings: Settings) -> String {
    let o = &pipeline.options;
    let mut weights = String::new();
    if let Some(file) = &o.transformer_file {
        weights.push_str(&format!(", transformer: {}", file.display()));
    }
    if let Some(q) = o.quantize {
        weights.push_str(&format!(", quantize: {}", q.name()));
    }
    let loras: String = args
        .sampling
        .loras
        .iter()
        .map(|l| format!(", LoRA {}:{}", l.source, l.scale))
        .collect();
    format!(
        "model: {}{weights}, device: {}, dtype: {} (VAE {}), attention: {}, steps: {}, \
         guidance: {}, runs: {} (+{} warmup){}, seed: {}{loras}",
        pipeline.model.label(),
        device_name(&o.device),
        dtype_name(o.dtype),
        dtype_name(o.vae_dtype()),
        pipeline.attention_kernel(),
        settings.steps,
        settings.guidance,
        args.runs,
        args.warmup,
        if args.batch > 1 {
            format!(" of {} images each (per-image means)", args.batch)
        } else {
            String::new()
        },
        args.seed,
    )
}

fn table(
    args: &BenchArgs,
    pipeline: &Pipeline,
    settings: Settings,
    sizes: &[Size],
    runs: &[Run],
) -> String {
    let with_refs = !args.refs.is_empty();
    let with_kv = with_refs && pipeline.kind() == PipelineKind::KleinKv;
    let mut head = vec!["size", "refs", "steps", "text encode ms"];
    if with_refs {
        head.push("ref encode ms");
    }
    if with_kv {
        head.push("ref K/V ms");
    }
    head.extend(["step ms", "VAE ms", "total ms", "peak mem"]);
    let mut rows: Vec<Vec<String>> = Vec::new();
    for size in sizes {
        let rs = runs_of(runs, size);
        if rs.is_empty() {
            continue;
        }
        let mut row = vec![
            size.to_string(),
            args.refs.len().to_string(),
            settings.steps.to_string(),
        ];
        for (name, f) in COLUMNS {
            if (name == "reference_encode_ms" && !with_refs)
                || (name == "reference_kv_ms" && !with_kv)
            {
                continue;
            }
            let xs: Vec<f64> = rs.iter().map(|r| f(&r.timings)).collect();
            let (m, s) = stats(&xs);
            row.push(format!("{m:.1} ± {s:.1}"));
        }
        row.push(
            rs.last()
                .and_then(|r| r.peak)
                .map(fmt_bytes)
                .unwrap_or_else(|| "n/a".into()),
        );
        rows.push(row);
    }
    let widths: Vec<usize> = (0..head.len())
        .map(|i| {
            rows.iter()
                .map(|r| r[i].chars().count())
                .chain([head[i].chars().count()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<String>| {
        let cells: Vec<String> = cells
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (c, w))| {
                let pad = w - c.chars().count();
                if i == 0 {
                    format!(" {c}{} ", " ".repeat(pad))
                } else {
                    format!(" {}{c} ", " ".repeat(pad))
                }
            })
            .collect();
        format!("|{}|\n", cells.join("|"))
    };
    let mut out = header(args, pipeline, settings) + "\n\n";
    out += &line(head.iter().map(|s| s.to_string()).collect());
    out += &line(
        widths
            .iter()
            .enumerate()
            .map(|(i, w)| {
                if i == 0 {
                    "-".repeat(*w)
                } else {
                    format!("{}:", "-".repeat(w - 1))
                }
            })
            .collect(),
    );
    for row in rows {
        out += &line(row);
    }
    out
}

fn to_json(
    args: &BenchArgs,
    pipeline: &Pipeline,
    settings: Settings,
    sizes: &[Size],
    runs: &[Run],
) -> serde_json::Value {
    let o = &pipeline.options;
    let run_objs: Vec<_> = runs
        .iter()
        .map(|r| {
            let t = &r.timings;
            json!({
                "width": r.size.width,
                "height": r.size.height,
                "refs": args.refs.len(),
                "run": r.run,
                "image": r.image,
                "load_ms": ms(t.load),
                "text_encode_ms": ms(t.text_encode),
                "reference_encode_ms": ms(t.reference_encode),
                "reference_kv_ms": ms(t.reference_kv),
                "step_ms": t.steps.iter().map(|d| ms(*d)).collect::<Vec<_>>(),
                "mean_step_ms": mean_step_ms(t),
                "vae_decode_ms": ms(t.vae_decode),
                "total_ms": ms(t.total),
                "peak_device_memory_bytes": r.peak,
            })
        })
        .collect();
    let summary: Vec<_> = sizes
        .iter()
        .filter_map(|size| {
            let rs = runs_of(runs, size);
            if rs.is_empty() {
                return None;
            }
            let mut obj = serde_json::Map::new();
            obj.insert("width".into(), json!(size.width));
            obj.insert("height".into(), json!(size.height));
            obj.insert("refs".into(), json!(args.refs.len()));
            obj.insert("runs".into(), json!(rs.len()));
            for (name, f) in COLUMNS {
                let xs: Vec<f64> = rs.iter().map(|r| f(&r.timings)).collect();
                let (m, s) = stats(&xs);
                obj.insert(name.into(), json!({ "mean": m, "std": s }));
            }
            obj.insert(
                "peak_device_memory_bytes".into(),
                json!(rs.last().and_then(|r| r.peak)),
            );
            Some(serde_json::Value::Object(obj))
        })
        .collect();
    json!({
        "model": pipeline.model.id,
        "revision": pipeline.model.revision,
        "device": device_name(&o.device),
        "dtype": dtype_name(o.dtype),
        "attention_kernel": pipeline.attention_kernel(),
        "text_attention_kernel": pipeline.text_attention_kernel(),
        "vae_dtype": dtype_name(o.vae_dtype()),
        "vae_tile": o.vae_tile,
        "transformer_file": o.transformer_file.as_ref().map(|p| p.display().to_string()),
        "quantize": o.quantize.map(|q| q.name()),
        "prompt": args.prompt,
        "references": args.refs.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
        "loras": args.sampling.loras.iter().map(|l| json!({"path": l.source, "scale": l.scale})).collect::<Vec<_>>(),
        "steps": settings.steps,
        "guidance": settings.guidance,
        "seed": args.seed,
        // Images per run (`--batch`): each entry of `runs` is one image; `summary` counts images.
        "batch": args.batch,
        "warmup": args.warmup,
        "runs_per_size": args.runs,
        "software": format!("flux2-klein {}", env!("CARGO_PKG_VERSION")),
        "runs": run_objs,
        "summary": summary,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_stats() {
        let (m, s) = stats(&[1.0, 2.0, 3.0]);
        assert!((m - 2.0).abs() < 1e-12 && (s - 1.0).abs() < 1e-12);
        assert_eq!(stats(&[5.0]), (5.0, 0.0));
    }
}

//! The library's front door in process: `Pipeline::open` on a tiny diffusers-made model, then
//! `generate` / `generate_batch`, against the image diffusers made (within 1/255, as the CLI
//! tests), with the events a front end sees.

mod common;

use std::sync::Arc;

use candle_core::Device;
use flux2_klein::model_dir::ModelDir;
use flux2_klein::pipeline::{Event, Pipeline, PipelineOptions, Reference, Request, Stage};

const GIFU: &str = "A cat holding a sign that says \"Gifu AI Study Group\"";

fn open(model: &str) -> Pipeline {
    let dir = ModelDir::open_local(&common::model(model)).unwrap();
    Pipeline::open(dir, PipelineOptions::for_device(Device::Cpu)).unwrap()
}

fn golden(case: &str) -> image::RgbImage {
    image::open(common::case_dir(case).join("image.png"))
        .unwrap()
        .to_rgb8()
}

/// Largest per-channel difference.
fn max_diff(a: &image::RgbImage, b: &image::RgbImage) -> u8 {
    assert_eq!(a.dimensions(), b.dimensions());
    a.as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0)
}

fn reference(case: &str, k: usize) -> Reference {
    let path = common::case_dir(case).join(format!("ref_{k}.png"));
    Reference {
        image: Arc::new(flux2_klein::image_io::load_image(&path).unwrap()),
        name: path.display().to_string(),
    }
}

#[test]
fn generate_text_to_image_equals_diffusers() {
    let mut pipeline = open("tiny-w0");
    let mut request = Request::new(GIFU, 0);
    request.width = Some(64);
    request.height = Some(64);
    let mut stages = Vec::new();
    let mut steps = 0;
    let out = pipeline
        .generate(&request, &mut |e| match e {
            Event::StageStart(s) => stages.push(s),
            Event::Step { .. } => steps += 1,
            _ => {}
        })
        .unwrap();
    // The library's defaults for a distilled checkpoint.
    assert_eq!((out.steps, out.guidance, out.seed), (4, 1.0, 0));
    assert_eq!(steps, 4);
    assert_eq!(
        stages,
        [
            Stage::LoadTextEncoder,
            Stage::EncodePrompt,
            Stage::LoadTransformer,
            Stage::Denoise,
            Stage::LoadVaeDecoder,
            Stage::Decode
        ]
    );
    let max = max_diff(&out.image, &golden("t2i_64x64"));
    assert!(max <= 1, "t2i_64x64: max per-pixel difference {max} > 1");
}

/// A resident pipeline (a server's, a stream's) keeps the last prompt's embeddings: the same
/// prompt in the next call skips the text encoder and gives diffusers' image again; another
/// prompt is encoded.
#[test]
fn a_resident_pipeline_encodes_a_repeated_prompt_once() {
    let dir = ModelDir::open_local(&common::model("tiny-w0")).unwrap();
    let options = PipelineOptions {
        keep_resident: true,
        ..PipelineOptions::for_device(Device::Cpu)
    };
    let mut pipeline = Pipeline::open(dir, options).unwrap();
    let mut request = Request::new(GIFU, 0);
    request.width = Some(64);
    request.height = Some(64);
    let run = |pipeline: &mut Pipeline, request: &Request| {
        let mut stages = Vec::new();
        let out = pipeline
            .generate(request, &mut |e| {
                if let Event::StageStart(s) = e {
                    stages.push(s)
                }
            })
            .unwrap();
        (out, stages.contains(&Stage::EncodePrompt))
    };
    let (first, encoded) = run(&mut pipeline, &request);
    assert!(encoded);
    let (again, encoded) = run(&mut pipeline, &request);
    assert!(!encoded, "the repeated prompt was encoded again");
    assert_eq!(again.timings.text_encode, std::time::Duration::ZERO);
    assert_eq!(again.image, first.image);
    let max = max_diff(&again.image, &golden("t2i_64x64"));
    assert!(
        max <= 1,
        "t2i_64x64 from the kept embeddings: max difference {max} > 1"
    );
    request.prompt = "a red fox".into();
    let (other, encoded) = run(&mut pipeline, &request);
    assert!(encoded, "another prompt must be encoded");
    assert!(
        max_diff(&other.image, &first.image) > 1,
        "another prompt, another image"
    );
}

/// An edit and a text-to-image request in one batch: each equals diffusers' image, and the
/// edit's references are what changes the image (the test can fail).
#[test]
fn generate_batch_edit_and_text_to_image_equal_diffusers() {
    let mut pipeline = open("tiny-w0");
    let mut edit = Request::new(GIFU, 0);
    edit.width = Some(64);
    edit.height = Some(64);
    edit.references = vec![reference("edit2_64x64", 0), reference("edit2_64x64", 1)];
    let mut plain = edit.clone();
    plain.references.clear();
    let mut images = Vec::new();
    pipeline
        .generate_batch(&[edit, plain], &mut |_| {}, &mut |i, g| {
            images.push((i, g.image));
            Ok(())
        })
        .unwrap();
    assert_eq!(images.len(), 2);
    assert_eq!((images[0].0, images[1].0), (0, 1));
    let max = max_diff(&images[0].1, &golden("edit2_64x64"));
    assert!(max <= 1, "edit2_64x64: max per-pixel difference {max} > 1");
    let max = max_diff(&images[1].1, &golden("t2i_64x64"));
    assert!(
        max <= 1,
        "t2i_64x64 in a batch: max per-pixel difference {max} > 1"
    );
    assert!(
        max_diff(&images[0].1, &images[1].1) > 16,
        "the references do not change the image"
    );
}

/// Bad input is an error before any model work, named after the request.
#[test]
fn zero_steps_is_an_error() {
    let mut pipeline = open("tiny-w0");
    let mut request = Request::new(GIFU, 0);
    request.steps = Some(0);
    let mut loaded = false;
    let err = pipeline
        .generate(&request, &mut |e| {
            if let Event::StageStart(Stage::LoadTextEncoder) = e {
                loaded = true;
            }
        })
        .unwrap_err();
    assert!(err.to_string().contains("steps"), "{err}");
    assert!(!loaded, "a model was loaded before the request was checked");
}

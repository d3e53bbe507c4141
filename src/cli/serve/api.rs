//! What a request asks for, checked before it is queued: the OpenAI Images API's bodies
//! (JSON for generations, multipart for edits), our native prompt-file line, and the errors
//! in OpenAI's shape. Everything here is CPU work on the request's own bytes; the server
//! never reads a file a request names.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use flux2_klein::image_io::{self, OutputFormat};
use flux2_klein::limits;
use flux2_klein::lora::AppliedLora;
use flux2_klein::pipeline::inpaint::{self, DEFAULT_STRENGTH};
use flux2_klein::pipeline::{self, InitImage, Reference, Request};
use image::DynamicImage;
use serde::de::IgnoredAny;
use serde::Deserialize;

use super::super::args::parse_size;
use super::super::jobs;

/// An error answer: OpenAI's `{"error": {"message", "type", "param", "code"}}` with its
/// HTTP status.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// The request field at fault, if one is.
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// 429: when to try again.
    pub retry_after: Option<Duration>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            param: None,
            code: None,
            retry_after: None,
        }
    }

    /// 400, blaming `param` when given.
    pub fn bad(param: Option<&str>, message: impl Into<String>) -> Self {
        Self {
            param: param.map(str::to_string),
            ..Self::new(StatusCode::BAD_REQUEST, message)
        }
    }

    pub fn server(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self {
            code: Some("invalid_api_key"),
            ..Self::new(StatusCode::UNAUTHORIZED, message)
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self {
            code: Some("not_found"),
            ..Self::new(StatusCode::NOT_FOUND, message)
        }
    }

    pub fn too_large(max_mib: u32) -> Self {
        Self {
            code: Some("request_too_large"),
            ..Self::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the request body is larger than the server's limit of {max_mib} MiB — send \
                     smaller images (the server's --max-body-mib sets the limit)"
                ),
            )
        }
    }

    pub fn queue_full(retry_after: Duration) -> Self {
        Self {
            code: Some("queue_full"),
            retry_after: Some(retry_after),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "the server's queue is full — retry after the time in the Retry-After header \
                 (the server's --max-queue sets the queue's length)",
            )
        }
    }

    pub fn shutting_down() -> Self {
        Self {
            code: Some("shutting_down"),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the server is shutting down and did not start this request — send it again \
                 once the server is back",
            )
        }
    }

    /// OpenAI's error `type` for the status.
    fn kind(&self) -> &'static str {
        match self.status {
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind(),
                "param": self.param,
                "code": self.code,
            }
        });
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(wait) = self.retry_after {
            // Whole seconds, rounded up (a client that waits the header's time finds room).
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        response
    }
}

/// What every request shares: the server's options.
pub struct Config {
    /// The most images one request may ask for (`--max-n`).
    pub max_n: u32,
    /// `--max-area` in pixels.
    pub max_area: u64,
    /// `--steps` / `--guidance`: the defaults of requests that do not say.
    pub steps: Option<u32>,
    pub guidance: Option<f64>,
    /// `--lora`: merged for every request.
    pub adapters: Vec<AppliedLora>,
    /// The model's id (`/v1/models`).
    pub model_id: String,
    pub max_body_mib: u32,
}

/// The fields of `/v1/images/generations` (JSON) and `/v1/images/edits` (form fields):
/// OpenAI's, and our settings as extra fields (what the official client sends through
/// `extra_body`). Any other field is an error, so a misspelt setting is not silently
/// ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageParams {
    pub prompt: Option<String>,
    pub n: Option<u32>,
    pub size: Option<String>,
    pub response_format: Option<String>,
    pub output_format: Option<String>,
    /// JPEG quality in percent (OpenAI's 0-100).
    pub output_compression: Option<u8>,
    /// Accepted and ignored: this server runs one model.
    #[serde(rename = "model")]
    _model: Option<IgnoredAny>,
    /// Accepted and ignored: they choose between OpenAI's own models' variants.
    #[serde(rename = "quality")]
    _quality: Option<IgnoredAny>,
    #[serde(rename = "style")]
    _style: Option<IgnoredAny>,
    #[serde(rename = "user")]
    _user: Option<IgnoredAny>,
    #[serde(rename = "background")]
    _background: Option<IgnoredAny>,
    #[serde(rename = "moderation")]
    _moderation: Option<IgnoredAny>,
    #[serde(rename = "input_fidelity")]
    _input_fidelity: Option<IgnoredAny>,
    #[serde(rename = "partial_images")]
    _partial_images: Option<IgnoredAny>,
    pub stream: Option<bool>,
    pub seed: Option<u64>,
    pub steps: Option<u32>,
    pub guidance: Option<f64>,
    pub negative_prompt: Option<String>,
    /// Edits: how much of the init image is repainted.
    pub strength: Option<f64>,
}

/// The fields a form sends as text that are numbers or booleans in JSON.
const NUMBER_FIELDS: [&str; 5] = ["n", "seed", "steps", "output_compression", "partial_images"];
const FLOAT_FIELDS: [&str; 2] = ["guidance", "strength"];

impl ImageParams {
    /// A JSON body.
    pub fn from_json(body: &[u8]) -> Result<Self, ApiError> {
        serde_json::from_slice(body).map_err(|e| body_error(&e))
    }

    /// A form's text fields (each value a string, as multipart sends them).
    pub fn from_form(fields: Vec<(String, String)>) -> Result<Self, ApiError> {
        let mut map = serde_json::Map::new();
        for (name, value) in fields {
            let v = value.trim();
            let json = if NUMBER_FIELDS.contains(&name.as_str()) {
                v.parse::<u64>().map(serde_json::Value::from).ok()
            } else if FLOAT_FIELDS.contains(&name.as_str()) {
                v.parse::<f64>().ok().map(serde_json::Value::from)
            } else if name == "stream" {
                v.parse::<bool>().ok().map(serde_json::Value::from)
            } else {
                None
            };
            // A value that does not parse stays a string: serde names the field and the type.
            map.insert(name, json.unwrap_or(serde_json::Value::String(value)));
        }
        serde_json::from_value(serde_json::Value::Object(map)).map_err(|e| body_error(&e))
    }
}

/// A body that does not deserialise: 400, blaming the field serde names.
fn body_error(e: &serde_json::Error) -> ApiError {
    let text = e.to_string();
    let param = text
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split('`').next())
        .map(str::to_string);
    let message = match &param {
        Some(field) => format!(
            "unknown field \"{field}\" — the fields are OpenAI's (prompt, n, size, \
             response_format, output_format, output_compression, model) and seed, steps, \
             guidance, negative_prompt, strength"
        ),
        None => format!("invalid request body: {text}"),
    };
    ApiError {
        param,
        ..ApiError::bad(None, message)
    }
}

/// How the images go back.
#[derive(Debug, Clone, Copy)]
pub struct Output {
    pub format: OutputFormat,
    /// `response_format: "url"`: a data URL (the server keeps no files to link to).
    pub as_url: bool,
    pub jpeg_quality: u8,
}

impl Output {
    pub fn mime(&self) -> &'static str {
        match self.format {
            OutputFormat::Png => "image/png",
            OutputFormat::Jpeg => "image/jpeg",
            OutputFormat::WebP => "image/webp",
        }
    }

    pub fn name(&self) -> &'static str {
        match self.format {
            OutputFormat::Png => "png",
            OutputFormat::Jpeg => "jpeg",
            OutputFormat::WebP => "webp",
        }
    }
}

/// A checked request, ready to queue.
pub struct Prepared {
    /// Image k of n has seed + k.
    pub requests: Vec<Request>,
    pub output: Output,
    /// The content hash of each input image by name (for the images' metadata).
    pub hashes: HashMap<String, String>,
}

/// An uploaded file: its form field's file name (or none) and bytes.
pub struct Upload {
    pub file_name: Option<String>,
    pub bytes: axum::body::Bytes,
}

/// `/v1/images/generations`.
pub fn prepare_generation(params: ImageParams, config: &Config) -> Result<Prepared, ApiError> {
    prepare(params, Vec::new(), None, config)
}

/// `/v1/images/edits`: `images` in order, and the mask. Without a mask or a strength every
/// image is a reference (`--ref`); with a mask (inpainting) or a strength (image-to-image)
/// the first is the init image and the others are references.
pub fn prepare_edit(
    params: ImageParams,
    images: Vec<Upload>,
    mask: Option<Upload>,
    config: &Config,
) -> Result<Prepared, ApiError> {
    if images.is_empty() {
        return Err(ApiError::bad(
            Some("image"),
            "an edit needs at least one image: send it as the form's \"image\" file (or \
             several as \"image[]\")",
        ));
    }
    prepare(params, images, mask, config)
}

fn prepare(
    params: ImageParams,
    images: Vec<Upload>,
    mask: Option<Upload>,
    config: &Config,
) -> Result<Prepared, ApiError> {
    if params.stream == Some(true) {
        return Err(ApiError::bad(
            Some("stream"),
            "streaming (partial images) is not supported — send \"stream\": false or leave it out",
        ));
    }
    let prompt = params
        .prompt
        .ok_or_else(|| ApiError::bad(Some("prompt"), "\"prompt\" is required"))?;
    let n = params.n.unwrap_or(1);
    if n == 0 || n > config.max_n {
        return Err(ApiError::bad(
            Some("n"),
            format!(
                "\"n\" must be from 1 to {} (the server's --max-n), got {n}",
                config.max_n
            ),
        ));
    }
    let output = output(
        params.output_format.as_deref(),
        params.response_format.as_deref(),
        params.output_compression,
    )?;
    let size = match params.size.as_deref().map(str::trim) {
        None | Some("auto") | Some("") => None,
        Some(s) => {
            let size = parse_size(s)
                .map_err(|e| ApiError::bad(Some("size"), format!("\"size\" {s:?}: {e}")))?;
            Some((size.width as usize, size.height as usize))
        }
    };
    let mut hashes = HashMap::new();
    let init_wanted = mask.is_some() || params.strength.is_some();
    let mut images = images.into_iter().enumerate();
    let init = if init_wanted {
        let (i, upload) = images.next().ok_or_else(|| {
            ApiError::bad(
                Some("image"),
                "\"mask\" and \"strength\" need an image to edit: send it as the form's \
                 \"image\" file",
            )
        })?;
        let image = decode(&upload, "image", i, &mut hashes)?;
        inpaint::check_init_size(image.image.width(), image.image.height()).map_err(|e| {
            ApiError::bad(
                Some("image"),
                format!("the image to edit is {e} — send a larger image"),
            )
        })?;
        let mask = mask
            .map(|m| decode(&m, "mask", 0, &mut hashes).map(openai_mask))
            .transpose()?;
        let strength = params.strength.unwrap_or(DEFAULT_STRENGTH);
        let steps = params.steps.or(config.steps).unwrap_or(4) as usize;
        inpaint::t_start(steps, strength)
            .map_err(|e| ApiError::bad(Some("strength"), e.to_string()))?;
        if let Some((w, h)) = size {
            let (iw, ih) = (image.image.width() as usize, image.image.height() as usize);
            let floored = (
                pipeline::floor_to_multiple_of_16(iw),
                pipeline::floor_to_multiple_of_16(ih),
            );
            if (w, h) != (iw, ih) && (w, h) != floored {
                return Err(ApiError::bad(
                    Some("size"),
                    format!(
                        "an edited image keeps the size of the image sent ({iw}x{ih}): send \
                         \"size\": \"auto\" or leave it out, or resize the image to {w}x{h} first"
                    ),
                ));
            }
        }
        Some(InitImage {
            image: image.image,
            name: image.name,
            mask,
            strength,
            padding_mask_crop: None,
        })
    } else {
        None
    };
    let references = images
        .map(|(i, upload)| {
            let reference = decode(&upload, "image", i, &mut hashes)?;
            image_io::check_reference_size(reference.image.width(), reference.image.height())
                .map_err(|e| ApiError::bad(Some("image"), format!("{}: {e}", reference.name)))?;
            Ok(reference)
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    let request = Request {
        prompt,
        negative_prompt: params.negative_prompt.unwrap_or_default(),
        references,
        // An init image sets the size.
        width: size.filter(|_| init.is_none()).map(|s| s.0),
        height: size.filter(|_| init.is_none()).map(|s| s.1),
        steps: params.steps.or(config.steps).map(|s| s as usize),
        guidance: params.guidance.or(config.guidance),
        seed: 0,
        init,
        adapters: config.adapters.clone(),
    };
    let requests = check_and_seed(request, params.seed, n, config)?;
    Ok(Prepared {
        requests,
        output,
        hashes,
    })
}

/// `/v1/generate`: one prompt-file line (`{"prompt": …, "seed": …, "width": …}` or a plain
/// prompt), answered as `output`. The fields that name files are refused.
pub fn prepare_line(line: &str, output: Output, config: &Config) -> Result<Prepared, ApiError> {
    let job = match jobs::parse_line(line, 1) {
        Ok(Some(job)) => job,
        Ok(None) => {
            return Err(ApiError::bad(
                Some("prompt"),
                "the body is empty or a comment: send a prompt-file line, e.g. {\"prompt\": \
                 \"a red fox\", \"seed\": 7}",
            ))
        }
        Err(e) => {
            return Err(ApiError::bad(
                None,
                format!("invalid prompt-file line: {e}"),
            ))
        }
    };
    let files = [
        ("ref", job.refs.is_some()),
        ("init_image", job.init_image.is_some()),
        ("mask", job.mask.is_some()),
        ("output", job.output.is_some()),
        ("lora", job.lora.is_some()),
    ];
    if let Some((field, _)) = files.iter().find(|(_, given)| *given) {
        return Err(ApiError::bad(
            Some(field),
            format!(
                "\"{field}\" names a file, and the server reads no files a request names — \
                 send reference and init images to /v1/images/edits; adapters are the \
                 server's --lora"
            ),
        ));
    }
    if job.strength.is_some() || job.padding_mask_crop.is_some() {
        return Err(ApiError::bad(
            Some("strength"),
            "\"strength\" and \"padding_mask_crop\" need an init image: send it to \
             /v1/images/edits",
        ));
    }
    let request = Request {
        prompt: job.prompt,
        negative_prompt: job.negative_prompt.unwrap_or_default(),
        references: Vec::new(),
        width: job.width.map(|w| w as usize),
        height: job.height.map(|h| h as usize),
        steps: job.steps.or(config.steps).map(|s| s as usize),
        guidance: job.guidance.or(config.guidance),
        seed: 0,
        init: None,
        adapters: config.adapters.clone(),
    };
    let requests = check_and_seed(request, job.seed, 1, config)?;
    Ok(Prepared {
        requests,
        output,
        hashes: HashMap::new(),
    })
}

/// The request against the ceilings the pipeline would refuse it by (so that it is refused
/// before it waits in the queue), then `n` copies with seeds `seed`, `seed + 1`, … (a
/// random `seed` when none is given).
fn check_and_seed(
    request: Request,
    seed: Option<u64>,
    n: u32,
    config: &Config,
) -> Result<Vec<Request>, ApiError> {
    // The pipeline's own checks (`pipeline::check_request`), each blaming its field.
    let bad =
        |param: &'static str| move |e: anyhow::Error| ApiError::bad(Some(param), e.to_string());
    if let Some(steps) = request.steps {
        limits::check_steps(steps).map_err(bad("steps"))?;
    }
    if let Some(guidance) = request.guidance {
        limits::check_guidance(guidance).map_err(bad("guidance"))?;
    }
    limits::check_reference_count(request.references.len()).map_err(bad("image"))?;
    if request.init.is_none() {
        let first = request.references.first().map(|r| {
            let (w, h) = image_io::prepared_reference_size(r.image.width(), r.image.height());
            (w as usize, h as usize)
        });
        pipeline::resolve_size(
            request.width,
            request.height,
            first,
            config.max_area,
            &mut |_| {},
        )
        .map_err(|e| ApiError::bad(Some("size"), e.to_string()))?;
    }
    let seed = seed.unwrap_or_else(|| rand::random::<u32>() as u64);
    Ok((0..n as u64)
        .map(|k| Request {
            seed: seed.wrapping_add(k),
            ..request.clone()
        })
        .collect())
}

/// `output_format`, `response_format` and `output_compression`.
pub fn output(
    format: Option<&str>,
    response_format: Option<&str>,
    compression: Option<u8>,
) -> Result<Output, ApiError> {
    let format = match format.map(str::to_ascii_lowercase).as_deref() {
        None | Some("png") => OutputFormat::Png,
        Some("jpeg" | "jpg") => OutputFormat::Jpeg,
        Some("webp") => OutputFormat::WebP,
        Some(other) => {
            return Err(ApiError::bad(
                Some("output_format"),
                format!("\"output_format\" must be png, jpeg or webp, got {other:?}"),
            ))
        }
    };
    let as_url = match response_format {
        None | Some("b64_json") => false,
        Some("url") => true,
        Some(other) => {
            return Err(ApiError::bad(
                Some("response_format"),
                format!("\"response_format\" must be b64_json or url, got {other:?}"),
            ))
        }
    };
    let jpeg_quality = match compression {
        None => image_io::JPEG_QUALITY,
        Some(c) if c <= 100 => c.max(1),
        Some(c) => {
            return Err(ApiError::bad(
                Some("output_compression"),
                format!("\"output_compression\" must be from 0 to 100, got {c}"),
            ))
        }
    };
    Ok(Output {
        format,
        as_url,
        jpeg_quality,
    })
}

/// An uploaded image, decoded with the CLI's decoder (its size limits are checked from the
/// header, before any pixel buffer), named by its file name (else `field[i]`) and hashed.
fn decode(
    upload: &Upload,
    field: &str,
    index: usize,
    hashes: &mut HashMap<String, String>,
) -> Result<Reference, ApiError> {
    let fallback = format!("{field}[{index}]");
    let image = image_io::decode_image(&upload.bytes).map_err(|e| {
        ApiError::bad(
            Some(field),
            format!(
                "cannot decode {} ({}) — send a PNG, JPEG or WebP file",
                upload.file_name.as_deref().unwrap_or(&fallback),
                e.root_cause()
            ),
        )
    })?;
    let hash = image_io::sha256_hex(&upload.bytes);
    // Two different files of one name keep distinct names in the metadata.
    let mut name = upload.file_name.clone().unwrap_or(fallback.clone());
    if hashes.get(&name).is_some_and(|h| *h != hash) {
        name = format!("{name} ({fallback})");
    }
    hashes.insert(name.clone(), hash);
    Ok(Reference {
        image: Arc::new(image),
        name,
    })
}

/// OpenAI's masks mark the area to edit as transparent (alpha 0); ours, the CLI's, as
/// white. A mask with an alpha channel is read OpenAI's way (its alpha inverted), one
/// without as the CLI reads it.
fn openai_mask(mask: Reference) -> Reference {
    if !mask.image.color().has_alpha() {
        return mask;
    }
    let rgba = mask.image.to_rgba8();
    let repaint = image::GrayImage::from_fn(rgba.width(), rgba.height(), |x, y| {
        image::Luma([255 - rgba.get_pixel(x, y).0[3]])
    });
    Reference {
        image: Arc::new(DynamicImage::ImageLuma8(repaint)),
        name: mask.name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config {
            max_n: 4,
            max_area: limits::DEFAULT_MAX_AREA,
            steps: None,
            guidance: None,
            adapters: Vec::new(),
            model_id: "tiny".into(),
            max_body_mib: 1,
        }
    }

    #[test]
    fn generations_seed_each_image() {
        let params =
            ImageParams::from_json(br#"{"prompt":"x","n":3,"seed":7,"size":"64x48"}"#).unwrap();
        let p = prepare_generation(params, &config()).unwrap();
        let seeds: Vec<u64> = p.requests.iter().map(|r| r.seed).collect();
        assert_eq!(seeds, [7, 8, 9]);
        assert_eq!(
            (p.requests[0].width, p.requests[0].height),
            (Some(64), Some(48))
        );
    }

    #[test]
    fn bad_fields_name_themselves() {
        let e = ImageParams::from_json(br#"{"prompt":"x","bogus":1}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("bogus"));
        let param = |body: &[u8]| {
            let params = ImageParams::from_json(body).unwrap();
            prepare_generation(params, &config()).err().unwrap().param
        };
        assert_eq!(param(br#"{"n":1}"#).as_deref(), Some("prompt"));
        assert_eq!(param(br#"{"prompt":"x","n":5}"#).as_deref(), Some("n"));
        assert_eq!(
            param(br#"{"prompt":"x","size":"63x"}"#).as_deref(),
            Some("size")
        );
        assert_eq!(
            param(br#"{"prompt":"x","size":"4096x4096"}"#).as_deref(),
            Some("size")
        );
        assert_eq!(
            param(br#"{"prompt":"x","steps":0}"#).as_deref(),
            Some("steps")
        );
        assert_eq!(
            param(br#"{"prompt":"x","steps":1001}"#).as_deref(),
            Some("steps")
        );
        assert_eq!(
            param(br#"{"prompt":"x","output_format":"gif"}"#).as_deref(),
            Some("output_format")
        );
    }

    #[test]
    fn form_fields_become_typed() {
        let fields = [
            ("prompt", "x"),
            ("n", "2"),
            ("strength", "0.5"),
            ("model", "m"),
        ];
        let p = ImageParams::from_form(
            fields
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
        .unwrap();
        assert_eq!((p.n, p.strength), (Some(2), Some(0.5)));
        let e = ImageParams::from_form(vec![("n".into(), "two".into())]).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
    }

    #[test]
    fn prompt_lines_may_not_name_files() {
        let out = output(None, None, None).unwrap();
        for line in [
            r#"{"prompt":"x","ref":["/etc/passwd"]}"#,
            r#"{"prompt":"x","init_image":"a.png"}"#,
            r#"{"prompt":"x","output":"/tmp/x.png"}"#,
            r#"{"prompt":"x","lora":["a.safetensors"]}"#,
        ] {
            let e = prepare_line(line, out, &config()).err().unwrap();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{line}");
        }
        let p = prepare_line(
            r#"{"prompt":"x","seed":3,"width":64,"height":64}"#,
            out,
            &config(),
        )
        .unwrap();
        assert_eq!(p.requests[0].seed, 3);
    }

    #[test]
    fn alpha_masks_are_inverted() {
        let mut rgba = image::RgbaImage::new(2, 1);
        rgba.put_pixel(0, 0, image::Rgba([0, 0, 0, 0]));
        rgba.put_pixel(1, 0, image::Rgba([0, 0, 0, 255]));
        let mask = openai_mask(Reference {
            image: Arc::new(DynamicImage::ImageRgba8(rgba)),
            name: "m".into(),
        });
        assert_eq!(mask.image.to_luma8().into_raw(), [255, 0]);
    }
}

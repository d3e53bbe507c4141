//! The settings an image file carries, read and written without touching its pixels.
//!
//! - PNG: one tEXt chunk per key (iTXt for text that is not Latin-1), read by walking the
//!   chunks (also those after the image data) with a cap on inflated zTXt/iTXt text.
//! - JPEG and WebP: the same keys as one JSON object in the EXIF `UserComment` (tag 0x9286,
//!   `UNICODE` = UTF-16 in the EXIF byte order, big-endian here). That is where AUTOMATIC1111
//!   and Forge write their parameters for JPEG and WebP, and what exiftool (`-UserComment`),
//!   Pillow (`getexif().get_ifd(0x8769)[0x9286]`) and most image viewers show; XMP would need
//!   an XML writer and parser and is read by fewer of those tools.

use anyhow::{anyhow, bail, Result};

use crate::limits::MAX_METADATA_TEXT_BYTES;

const PNG_SIGNATURE: &[u8; 8] = b"\x89PNG\r\n\x1a\n";
/// EXIF tags: the pointer to the Exif IFD, and its `UserComment`.
const EXIF_IFD_POINTER: u16 = 0x8769;
const USER_COMMENT: u16 = 0x9286;
/// The `UserComment` character code for UTF-16 text.
const UNICODE_CODE: &[u8; 8] = b"UNICODE\0";
/// The most EXIF bytes a JPEG APP1 segment holds (65535 − length − `Exif\0\0`).
pub const MAX_JPEG_EXIF_BYTES: usize = 65535 - 2 - 6;

/// Which container a file's first bytes say it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Container {
    Png,
    Jpeg,
    WebP,
}

/// The container of `bytes` by its signature, if it is one that carries settings.
pub fn container_of(bytes: &[u8]) -> Option<Container> {
    if bytes.starts_with(PNG_SIGNATURE) {
        Some(Container::Png)
    } else if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Some(Container::Jpeg)
    } else if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        Some(Container::WebP)
    } else {
        None
    }
}

/// The settings recorded in an image file's bytes as `(key, value)` in file order: PNG text
/// chunks, or the JSON object in a JPEG's or WebP's EXIF `UserComment`. Empty when the file
/// carries none; an error when it is damaged or its text is over [`MAX_METADATA_TEXT_BYTES`].
pub fn read_metadata(bytes: &[u8]) -> Result<Vec<(String, String)>> {
    match container_of(bytes) {
        Some(Container::Png) => png_text_chunks(bytes),
        Some(Container::Jpeg) => jpeg_exif(bytes)?.map_or(Ok(vec![]), |e| settings_of_exif(&e)),
        Some(Container::WebP) => webp_exif(bytes)?.map_or(Ok(vec![]), |e| settings_of_exif(&e)),
        None => bail!("not a PNG, JPEG or WebP file"),
    }
}

/// The text chunks of a PNG (tEXt, zTXt, iTXt) in file order, without decoding the pixels.
pub fn png_text_chunks(bytes: &[u8]) -> Result<Vec<(String, String)>> {
    if !bytes.starts_with(PNG_SIGNATURE) {
        bail!("not a PNG file");
    }
    let mut out = Vec::new();
    let mut text_bytes = 0usize;
    let mut pos = PNG_SIGNATURE.len();
    loop {
        let head = bytes
            .get(pos..pos + 8)
            .ok_or_else(|| anyhow!("the PNG is truncated (no IEND chunk)"))?;
        let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let kind = &head[4..8];
        let data = pos
            .checked_add(8 + len)
            .and_then(|end| bytes.get(pos + 8..end))
            .ok_or_else(|| anyhow!("the PNG is truncated (a chunk runs past the end)"))?;
        pos += 12 + len;
        let (key, text) = match kind {
            b"IEND" => break,
            b"tEXt" => {
                let (key, text) = split_keyword(data)?;
                (key, latin1(text))
            }
            b"zTXt" => {
                let (key, rest) = split_keyword(data)?;
                let (&method, z) = rest
                    .split_first()
                    .ok_or_else(|| anyhow!("zTXt {key:?} is empty"))?;
                if method != 0 {
                    bail!("zTXt {key:?} uses the unknown compression method {method}");
                }
                (key.clone(), latin1(&inflate(z, &key, text_bytes)?))
            }
            b"iTXt" => {
                let (key, rest) = split_keyword(data)?;
                let [flag, method, rest @ ..] = rest else {
                    bail!("iTXt {key:?} is truncated");
                };
                // Language tag and translated keyword, each 0-terminated.
                let mut parts = rest.splitn(3, |&b| b == 0);
                let (_, _, body) = (parts.next(), parts.next(), parts.next());
                let body = body.ok_or_else(|| anyhow!("iTXt {key:?} is truncated"))?;
                let raw = match (flag, method) {
                    (0, _) => body.to_vec(),
                    (1, 0) => inflate(body, &key, text_bytes)?,
                    _ => bail!("iTXt {key:?} uses the unknown compression method {method}"),
                };
                let text =
                    String::from_utf8(raw).map_err(|_| anyhow!("iTXt {key:?} is not UTF-8"))?;
                (key, text)
            }
            _ => continue,
        };
        text_bytes += text.len();
        if text_bytes > MAX_METADATA_TEXT_BYTES {
            bail!(
                "the PNG's text chunks hold more than {} KiB of text — not settings flux2-klein \
                 wrote",
                MAX_METADATA_TEXT_BYTES >> 10
            );
        }
        out.push((key, text));
    }
    Ok(out)
}

/// `keyword\0rest` of a text chunk; the keyword is 1–79 Latin-1 characters.
fn split_keyword(data: &[u8]) -> Result<(String, &[u8])> {
    let nul = data
        .iter()
        .position(|&b| b == 0)
        .filter(|&n| (1..=79).contains(&n))
        .ok_or_else(|| anyhow!("a PNG text chunk has no valid keyword"))?;
    Ok((latin1(&data[..nul]), &data[nul + 1..]))
}

fn latin1(bytes: &[u8]) -> String {
    bytes.iter().map(|&b| b as char).collect()
}

/// zlib data inflated to at most what is left of the text cap.
fn inflate(z: &[u8], key: &str, used: usize) -> Result<Vec<u8>> {
    let room = MAX_METADATA_TEXT_BYTES.saturating_sub(used);
    miniz_oxide::inflate::decompress_to_vec_zlib_with_limit(z, room).map_err(|e| {
        if matches!(e.status, miniz_oxide::inflate::TINFLStatus::HasMoreOutput) {
            anyhow!(
                "the PNG text chunk {key:?} inflates to more than {} KiB — not settings \
                 flux2-klein wrote",
                MAX_METADATA_TEXT_BYTES >> 10
            )
        } else {
            anyhow!("the PNG text chunk {key:?} is damaged (bad zlib data)")
        }
    })
}

/// The EXIF (TIFF bytes, without the `Exif\0\0` prefix) of a JPEG, if it has an APP1 Exif
/// segment before its image data.
pub fn jpeg_exif(bytes: &[u8]) -> Result<Option<Vec<u8>>> {
    let mut pos = 2;
    while pos + 4 <= bytes.len() {
        if bytes[pos] != 0xFF {
            bail!("the JPEG is damaged (no marker at byte {pos})");
        }
        let marker = bytes[pos + 1];
        // Fill bytes, and markers without a length.
        if marker == 0xFF {
            pos += 1;
            continue;
        }
        if marker == 0x01 || (0xD0..=0xD7).contains(&marker) {
            pos += 2;
            continue;
        }
        // Start of scan or end of image: no metadata after this.
        if marker == 0xDA || marker == 0xD9 {
            break;
        }
        let len = u16::from_be_bytes([bytes[pos + 2], bytes[pos + 3]]) as usize;
        let seg = bytes
            .get(pos + 4..pos + 2 + len.max(2))
            .ok_or_else(|| anyhow!("the JPEG is truncated"))?;
        if marker == 0xE1 && seg.starts_with(b"Exif\0\0") {
            return Ok(Some(seg[6..].to_vec()));
        }
        pos += 2 + len;
    }
    Ok(None)
}

/// The `EXIF` chunk of a WebP file, if any.
pub fn webp_exif(bytes: &[u8]) -> Result<Option<Vec<u8>>> {
    let mut pos = 12;
    while pos + 8 <= bytes.len() {
        let kind = &bytes[pos..pos + 4];
        let len = u32::from_le_bytes([
            bytes[pos + 4],
            bytes[pos + 5],
            bytes[pos + 6],
            bytes[pos + 7],
        ]) as usize;
        let data = (pos + 8)
            .checked_add(len)
            .and_then(|end| bytes.get(pos + 8..end))
            .ok_or_else(|| anyhow!("the WebP file is truncated"))?;
        if kind == b"EXIF" {
            // Some writers keep the JPEG-style prefix.
            let data = data.strip_prefix(b"Exif\0\0").unwrap_or(data);
            return Ok(Some(data.to_vec()));
        }
        // Chunks are padded to an even size.
        pos += 8 + len + (len & 1);
    }
    Ok(None)
}

/// EXIF (a big-endian TIFF structure) holding `settings` as one JSON object in `UserComment`.
pub fn exif_with_settings(settings: &[(String, String)]) -> Vec<u8> {
    let json = serde_json::Value::Object(
        settings
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect(),
    )
    .to_string();
    let mut comment = UNICODE_CODE.to_vec();
    for unit in json.encode_utf16() {
        comment.extend_from_slice(&unit.to_be_bytes());
    }
    // Header (8) | IFD0: count, one entry, next (18) | Exif IFD: the same (18) | comment.
    let exif_ifd = 8 + 18;
    let comment_at = exif_ifd + 18;
    let mut out = b"MM\0\x2a\0\0\0\x08".to_vec();
    let entry = |out: &mut Vec<u8>, tag: u16, kind: u16, count: u32, value: u32| {
        out.extend_from_slice(&1u16.to_be_bytes());
        out.extend_from_slice(&tag.to_be_bytes());
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(&count.to_be_bytes());
        out.extend_from_slice(&value.to_be_bytes());
        out.extend_from_slice(&0u32.to_be_bytes());
    };
    // LONG (4) pointer; UNDEFINED (7) bytes at an offset.
    entry(&mut out, EXIF_IFD_POINTER, 4, 1, exif_ifd as u32);
    entry(
        &mut out,
        USER_COMMENT,
        7,
        comment.len() as u32,
        comment_at as u32,
    );
    out.extend_from_slice(&comment);
    out
}

/// The settings in an EXIF `UserComment` that holds a JSON object of strings (as
/// [`exif_with_settings`] writes it); empty when there is no such comment.
pub fn settings_of_exif(exif: &[u8]) -> Result<Vec<(String, String)>> {
    let Some(comment) = user_comment(exif) else {
        return Ok(vec![]);
    };
    if !comment.trim_start().starts_with('{') {
        return Ok(vec![]);
    }
    let value: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&comment)
        .map_err(|e| anyhow!("its EXIF UserComment is not valid JSON: {e}"))?;
    Ok(value
        .into_iter()
        .map(|(k, v)| match v {
            serde_json::Value::String(s) => (k, s),
            other => (k, other.to_string()),
        })
        .collect())
}

/// The `UserComment` text of an EXIF block (either byte order), if present and readable.
fn user_comment(exif: &[u8]) -> Option<String> {
    let big = match exif.get(..4)? {
        b"MM\0\x2a" => true,
        b"II\x2a\0" => false,
        _ => return None,
    };
    let u16_at = |at: usize| -> Option<u16> {
        let b = exif.get(at..at + 2)?;
        Some(if big {
            u16::from_be_bytes([b[0], b[1]])
        } else {
            u16::from_le_bytes([b[0], b[1]])
        })
    };
    let u32_at = |at: usize| -> Option<u32> {
        let b = exif.get(at..at + 4)?;
        Some(if big {
            u32::from_be_bytes([b[0], b[1], b[2], b[3]])
        } else {
            u32::from_le_bytes([b[0], b[1], b[2], b[3]])
        })
    };
    // (count, value/offset) of `tag` in the IFD at `ifd`.
    let find = |ifd: usize, tag: u16| -> Option<(usize, usize)> {
        let n = u16_at(ifd)? as usize;
        (0..n).find_map(|i| {
            let e = ifd + 2 + 12 * i;
            (u16_at(e)? == tag).then_some((u32_at(e + 4)? as usize, u32_at(e + 8)? as usize))
        })
    };
    let ifd0 = u32_at(4)? as usize;
    let (_, exif_ifd) = find(ifd0, EXIF_IFD_POINTER)?;
    let (count, offset) = find(exif_ifd, USER_COMMENT)?;
    if !(8..=MAX_METADATA_TEXT_BYTES * 2).contains(&count) {
        return None;
    }
    let data = exif.get(offset..offset.checked_add(count)?)?;
    let (code, text) = data.split_at(8);
    if code == UNICODE_CODE {
        // UTF-16 in the EXIF byte order; a byte-order mark, if any, wins.
        let mut units: Vec<u16> = text
            .chunks_exact(2)
            .map(|c| {
                if big {
                    u16::from_be_bytes([c[0], c[1]])
                } else {
                    u16::from_le_bytes([c[0], c[1]])
                }
            })
            .collect();
        if units.first() == Some(&0xFFFE) {
            units = units.iter().map(|u| u.swap_bytes()).collect();
        }
        if units.first() == Some(&0xFEFF) {
            units.remove(0);
        }
        String::from_utf16(&units).ok()
    } else {
        // ASCII (or undefined): take it as UTF-8.
        String::from_utf8(text.to_vec()).ok()
    }
    .map(|s| s.trim_end_matches('\0').to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exif_round_trip() {
        let settings = vec![
            ("prompt".to_string(), "un café ☕\n\"quoted\"".to_string()),
            ("seed".to_string(), "42".to_string()),
        ];
        let exif = exif_with_settings(&settings);
        assert_eq!(settings_of_exif(&exif).unwrap(), settings);
        assert!(settings_of_exif(b"II\x2a\0").unwrap().is_empty());
    }
}

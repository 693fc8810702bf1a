//! QR codes: terminal art and PNG files to show, and decoding of photos
//! and screenshots (PNG or JPEG) in-process.

use std::path::Path;

use anyhow::Context;
use image::{ImageReader, Luma};
use qrcode::{Color, EcLevel, QrCode};

use super::exit::{fail, BAD_INVITATION};

fn code(text: &str) -> anyhow::Result<QrCode> {
    // Level M survives a smudge or a bit of glare; the link is upper-case so
    // the encoder picks the compact alphanumeric mode.
    QrCode::with_error_correction_level(text.as_bytes(), EcLevel::M).context("making the QR code")
}

/// Terminal art: two modules per character cell with half blocks. With
/// `color`, explicit black-on-white ANSI colours so the code scans on dark
/// and light terminals alike.
pub fn terminal(text: &str, color: bool) -> anyhow::Result<String> {
    let code = code(text)?;
    let width = code.width();
    let quiet = 2usize;
    let size = width + 2 * quiet;
    let dark = |x: usize, y: usize| -> bool {
        x >= quiet
            && y >= quiet
            && x < quiet + width
            && y < quiet + width
            && code[(x - quiet, y - quiet)] == Color::Dark
    };
    let mut out = String::new();
    for row in (0..size).step_by(2) {
        for x in 0..size {
            let top = dark(x, row);
            let bottom = row + 1 < size && dark(x, row + 1);
            if color {
                // foreground paints the upper half, background the lower.
                let fg = if top { 16 } else { 231 };
                let bg = if bottom { 16 } else { 231 };
                out.push_str(&format!("\x1b[38;5;{fg};48;5;{bg}m\u{2580}"));
            } else {
                out.push(match (top, bottom) {
                    (true, true) => '\u{2588}',
                    (true, false) => '\u{2580}',
                    (false, true) => '\u{2584}',
                    (false, false) => ' ',
                });
            }
        }
        if color {
            out.push_str("\x1b[0m");
        }
        out.push('\n');
    }
    Ok(out)
}

/// Writes a PNG: 8 pixels per module, a 4-module quiet zone.
pub fn png(text: &str, path: &Path) -> anyhow::Result<()> {
    let image = code(text)?
        .render::<Luma<u8>>()
        .module_dimensions(8, 8)
        .quiet_zone(true)
        .build();
    // Written beside and renamed into place, so that whoever waits for the
    // file (a script, a scanner watching a folder) never reads half of it.
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "invitation.png".into());
    let tmp = path.with_file_name(format!(".{name}.partial"));
    image
        .save_with_format(&tmp, image::ImageFormat::Png)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// Decodes the first QR code found in an image file.
pub fn decode_file(path: &Path) -> anyhow::Result<String> {
    let img = ImageReader::open(path)
        .with_context(|| format!("opening {}", path.display()))?
        .with_guessed_format()
        .with_context(|| format!("reading {}", path.display()))?
        .decode()
        .map_err(|e| {
            fail(
                BAD_INVITATION,
                format!(
                    "{} is not a readable PNG or JPEG image: {e}",
                    path.display()
                ),
            )
        })?
        .to_luma8();
    let mut prepared = rqrr::PreparedImage::prepare(img);
    for grid in prepared.detect_grids() {
        if let Ok((_, content)) = grid.decode() {
            return Ok(content);
        }
    }
    Err(fail(
        BAD_INVITATION,
        format!(
            "no QR code found in {}: try a sharper, closer picture, or paste the link",
            path.display()
        ),
    ))
}

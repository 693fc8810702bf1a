//! QR codes: terminal art and PNG files to show, and decoding of photos
//! and screenshots (PNG or JPEG) in-process.

use std::path::Path;

use anyhow::Context;
use image::{GrayImage, ImageReader, Luma};
use qrcode::{Color, EcLevel, QrCode};

use super::exit::{fail, BAD_INVITATION};

fn code(text: &str) -> anyhow::Result<QrCode> {
    // Level M survives a smudge or a bit of glare; the link is upper-case so
    // the encoder picks the compact alphanumeric mode.
    QrCode::with_error_correction_level(text.as_bytes(), EcLevel::M).context("making the QR code")
}

/// How the two kinds of module reach the screen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Palette {
    /// Explicit black on white (ANSI 256 colours): right on every terminal.
    Ansi,
    /// No colour (NO_COLOR): the light modules and the quiet zone are drawn
    /// in the terminal's text colour, the dark ones left as background. On a
    /// dark terminal that is a normal code; on a light one, a light-on-dark
    /// code that tern's reader and most phones read too.
    DrawLight,
    /// No colour, on a terminal known to be light (COLORFGBG): the dark
    /// modules drawn, the background as quiet zone.
    DrawDark,
}

impl Palette {
    /// From the environment: NO_COLOR, and COLORFGBG (set by rxvt, Konsole
    /// and others as "foreground;background") for the background's shade.
    pub fn from_env() -> Self {
        if std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()) {
            return Palette::Ansi;
        }
        let light_background = std::env::var("COLORFGBG")
            .ok()
            .and_then(|v| v.rsplit(';').next()?.parse::<u8>().ok())
            .is_some_and(|bg| bg == 7 || (9..=15).contains(&bg));
        if light_background {
            Palette::DrawDark
        } else {
            Palette::DrawLight
        }
    }
}

/// Columns and rows of the terminal the art is for: COLUMNS and LINES when
/// both are set (as the shell and many tools understand them), else the
/// size of the terminal on stdout; `None` when neither says.
pub fn terminal_size() -> Option<(usize, usize)> {
    let var = |name: &str| std::env::var(name).ok()?.trim().parse::<usize>().ok();
    if let (Some(c), Some(r)) = (var("COLUMNS"), var("LINES")) {
        return Some((c, r));
    }
    let (::terminal_size::Width(w), ::terminal_size::Height(h)) =
        ::terminal_size::terminal_size_of(std::io::stdout())?;
    Some((usize::from(w), usize::from(h)))
}

/// Terminal art of a QR code and the room it takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Art {
    pub text: String,
    pub columns: usize,
    pub rows: usize,
}

/// Why a code cannot be shown on this terminal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TooSmall {
    pub needs: (usize, usize),
    pub has: (usize, usize),
}

impl std::fmt::Display for TooSmall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the QR code needs {}×{} characters but this terminal has {}×{}",
            self.needs.0, self.needs.1, self.has.0, self.has.1
        )
    }
}

/// The layouts tried, most robust first: level M with the full quiet zone
/// of ISO/IEC 18004, then narrower quiet zones, then level L (a screen has
/// no smudges or folds) where it makes the symbol smaller.
const LAYOUTS: [(EcLevel, usize); 6] = [
    (EcLevel::M, 4),
    (EcLevel::M, 3),
    (EcLevel::M, 2),
    (EcLevel::L, 4),
    (EcLevel::L, 3),
    (EcLevel::L, 2),
];

/// Terminal art that fits `size` (columns, rows: the whole code on screen
/// with one line left for the prompt), or why nothing fits. Without a size,
/// the most robust layout.
pub fn terminal_fit(
    text: &str,
    palette: Palette,
    size: Option<(usize, usize)>,
) -> anyhow::Result<Result<Art, TooSmall>> {
    let mut smallest = None;
    for (level, quiet) in LAYOUTS {
        let code = QrCode::with_error_correction_level(text.as_bytes(), level)
            .context("making the QR code")?;
        let side = code.width() + 2 * quiet;
        let (columns, rows) = (side, side.div_ceil(2));
        let fits = size.is_none_or(|(c, r)| columns <= c && rows < r);
        if fits {
            return Ok(Ok(Art {
                text: draw(&code, quiet, palette),
                columns,
                rows,
            }));
        }
        smallest =
            Some(smallest.map_or((columns, rows), |s: (usize, usize)| s.min((columns, rows))));
    }
    Ok(Err(TooSmall {
        needs: smallest.expect("layouts tried"),
        has: size.expect("only a known size is too small"),
    }))
}

/// Terminal art for this terminal, as small as it needs to be; on a
/// terminal too small for any layout, the smallest one all the same.
pub fn terminal(text: &str, color: bool) -> anyhow::Result<String> {
    let palette = match (color, Palette::from_env()) {
        (true, _) => Palette::Ansi,
        (false, Palette::Ansi) => Palette::DrawLight,
        (false, p) => p,
    };
    let art = match terminal_fit(text, palette, terminal_size())? {
        Ok(art) => art,
        Err(small) => terminal_fit(text, palette, Some((small.needs.0, small.needs.1 + 1)))?
            .expect("the smallest layout fits its own size"),
    };
    Ok(art.text)
}

/// Shows `text` as a QR code on stdout if it fits this terminal, else says
/// on stderr why not; whether it was shown.
pub fn show(text: &str, instead: &str) -> anyhow::Result<bool> {
    match terminal_fit(text, Palette::from_env(), terminal_size())? {
        Ok(art) => {
            print!("{}", art.text);
            Ok(true)
        }
        Err(small) => {
            super::output::note(&format!(
                "{small}: enlarge the window (or use a smaller font), or {instead}"
            ));
            Ok(false)
        }
    }
}

/// Two modules per character cell, with half blocks.
fn draw(code: &QrCode, quiet: usize, palette: Palette) -> String {
    let width = code.width();
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
            // Past the last row is quiet zone (light).
            let top = dark(x, row);
            let bottom = row + 1 < size && dark(x, row + 1);
            let painted = |is_dark: bool| match palette {
                Palette::DrawLight => !is_dark,
                _ => is_dark,
            };
            match palette {
                Palette::Ansi => {
                    // foreground paints the upper half, background the lower.
                    let fg = if top { 16 } else { 231 };
                    let bg = if bottom { 16 } else { 231 };
                    out.push_str(&format!("\x1b[38;5;{fg};48;5;{bg}m\u{2580}"));
                }
                _ => {
                    // An odd last row: its lower half is outside the code,
                    // the terminal's own background.
                    let lower = row + 1 < size && painted(bottom);
                    out.push(match (painted(top), lower) {
                        (true, true) => '\u{2588}',
                        (true, false) => '\u{2580}',
                        (false, true) => '\u{2584}',
                        (false, false) => ' ',
                    });
                }
            }
        }
        if palette == Palette::Ansi {
            out.push_str("\x1b[0m");
        }
        out.push('\n');
    }
    out
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

/// Decodes the first QR code found in an image file (for an invitation).
pub fn decode_file(path: &Path) -> anyhow::Result<String> {
    match read_picture(path) {
        Err(e) => Err(fail(BAD_INVITATION, e)),
        Ok(None) => Err(fail(
            BAD_INVITATION,
            format!(
                "no QR code found in {}: try a sharper, closer picture, or paste the link",
                path.display()
            ),
        )),
        Ok(Some(text)) => Ok(text),
    }
}

/// The text of the first QR code in a PNG or JPEG file: `Ok(None)` when
/// there is none, `Err` with what to tell the user when the file is not a
/// readable picture.
pub fn read_picture(path: &Path) -> Result<Option<String>, String> {
    let img = ImageReader::open(path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?
        .with_guessed_format()
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?
        .decode()
        .map_err(|e| {
            format!(
                "{} is not a readable PNG or JPEG image: {e}",
                path.display()
            )
        })?
        .to_luma8();
    Ok(decode(&img))
}

/// The text of a QR code in a grey picture, as a phone's reader would find
/// it. ZXing's reader (the rxing port) comes first: its local thresholding
/// copes with blur, noise, uneven light, JPEG artefacts and codes a quarter
/// of their printed size, and it also reads light-on-dark codes (a NO_COLOR
/// code on a light terminal). quirc's (rqrr) comes second, for steep
/// keystone that ZXing's detector gives up on. BENCHMARKS.md has the
/// measurements behind the choice.
pub fn decode(img: &GrayImage) -> Option<String> {
    zxing(img, true).or_else(|| {
        quirc(img).or_else(|| {
            let mut inverted = img.clone();
            image::imageops::invert(&mut inverted);
            quirc(&inverted)
        })
    })
}

/// ZXing's reader (rxing), trying hard; `also_inverted`: light-on-dark
/// codes too.
pub fn zxing(img: &GrayImage, also_inverted: bool) -> Option<String> {
    let mut hints = rxing::DecodeHints {
        TryHarder: Some(true),
        AlsoInverted: Some(also_inverted),
        ..Default::default()
    };
    rxing::helpers::detect_in_luma_slice_with_hints(
        img.as_raw(),
        img.width(),
        img.height(),
        Some(rxing::BarcodeFormat::QR_CODE),
        &mut hints,
    )
    .ok()
    .map(|r| r.getText().to_string())
}

/// quirc's reader (rqrr), as it is.
pub fn quirc(img: &GrayImage) -> Option<String> {
    let mut prepared = rqrr::PreparedImage::prepare(img.clone());
    prepared
        .detect_grids()
        .into_iter()
        .find_map(|grid| grid.decode().ok().map(|(_, text)| text))
}

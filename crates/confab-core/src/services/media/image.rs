//! Uploaded images, judged by their content and re-encoded (SPEC §11): the magic bytes decide
//! the format (never a name or a declared type); the header's pixel count is checked before
//! anything is decoded (decompression bombs); decoding is bounded in memory; what is stored is
//! a fresh encoding of the pixels, so metadata (EXIF, GPS, comments, colour profiles) does not
//! survive, with the EXIF orientation applied first. Pure CPU work: callers run it on the
//! blocking pool.

use std::io::Cursor;
use std::time::Instant;

use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits};

use super::MediaError;

/// The formats we accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Jpeg,
    Png,
    WebP,
    Gif,
}

impl Format {
    /// The format the first bytes announce, if it is one we accept.
    pub fn sniff(bytes: &[u8]) -> Option<Self> {
        match bytes {
            [0xFF, 0xD8, 0xFF, ..] => Some(Self::Jpeg),
            [0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A, ..] => Some(Self::Png),
            [
                b'R',
                b'I',
                b'F',
                b'F',
                _,
                _,
                _,
                _,
                b'W',
                b'E',
                b'B',
                b'P',
                ..,
            ] => Some(Self::WebP),
            [b'G', b'I', b'F', b'8', b'7' | b'9', b'a', ..] => Some(Self::Gif),
            _ => None,
        }
    }

    pub fn extension(self) -> &'static str {
        match self {
            Self::Jpeg => "jpg",
            Self::Png => "png",
            Self::WebP => "webp",
            Self::Gif => "gif",
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Self::Jpeg => "image/jpeg",
            Self::Png => "image/png",
            Self::WebP => "image/webp",
            Self::Gif => "image/gif",
        }
    }

    fn image_format(self) -> ImageFormat {
        match self {
            Self::Jpeg => ImageFormat::Jpeg,
            Self::Png => ImageFormat::Png,
            Self::WebP => ImageFormat::WebP,
            Self::Gif => ImageFormat::Gif,
        }
    }

    /// What an upload of this format is stored as: a JPEG as a JPEG, a PNG as a PNG; a GIF's
    /// first frame as a PNG (no animation; lossless); a WebP as a JPEG, or as a PNG when it
    /// has transparency (no lossy WebP encoder: lossless WebP of a photo is many times its
    /// upload).
    fn stored_as(self, has_alpha: bool) -> Self {
        match self {
            Self::Jpeg => Self::Jpeg,
            Self::WebP if !has_alpha => Self::Jpeg,
            Self::Png | Self::Gif | Self::WebP => Self::Png,
        }
    }
}

/// What an upload may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageLimits {
    /// The largest upload, in bytes (SPEC §11: 10 MiB by default).
    pub max_bytes: usize,
    /// The most pixels (width × height) an image may declare (40 MP by default).
    pub max_pixels: u64,
    /// The longer side of a thumbnail, in pixels.
    pub thumbnail_px: u32,
}

impl Default for ImageLimits {
    fn default() -> Self {
        Self {
            max_bytes: 10 * 1024 * 1024,
            max_pixels: 40_000_000,
            thumbnail_px: 256,
        }
    }
}

/// One encoded image.
#[derive(Debug, Clone)]
pub struct Encoded {
    pub bytes: Vec<u8>,
    pub format: Format,
    pub width: u32,
    pub height: u32,
}

/// An upload, re-encoded, and its thumbnail.
#[derive(Debug, Clone)]
pub struct Processed {
    pub image: Encoded,
    pub thumbnail: Encoded,
}

fn corrupt(error: &image::ImageError) -> MediaError {
    match error {
        image::ImageError::Limits(_) => MediaError::TooManyPixels,
        other => {
            // The decoder's words stay in the log; the client gets one sentence.
            tracing::info!(error = %other, "An upload could not be decoded.");
            MediaError::Corrupt
        }
    }
}

/// Checks, decodes and re-encodes an upload, and makes its thumbnail. `deadline`: checked
/// between the stages (a decoder cannot be interrupted, but nothing more is started after
/// it); past it, `TimedOut`.
pub fn process(
    bytes: &[u8],
    limits: &ImageLimits,
    deadline: Option<Instant>,
) -> Result<Processed, MediaError> {
    let in_time = || match deadline {
        Some(at) if Instant::now() > at => Err(MediaError::TimedOut),
        _ => Ok(()),
    };
    in_time()?;
    let format = Format::sniff(bytes).ok_or(MediaError::Unsupported)?;
    if bytes.len() > limits.max_bytes {
        return Err(MediaError::TooLarge {
            max: limits.max_bytes,
        });
    }
    let reader = || {
        let mut reader = ImageReader::new(Cursor::new(bytes));
        reader.set_format(format.image_format());
        reader
    };
    // The header alone: a bomb is refused before a single pixel is decoded.
    let (width, height) = reader().into_dimensions().map_err(|e| corrupt(&e))?;
    if u64::from(width) * u64::from(height) > limits.max_pixels {
        return Err(MediaError::TooManyPixels);
    }
    let mut reader = reader();
    let mut bounds = Limits::default();
    // What the header said, for every frame; and at most 8 bytes (RGBA, 16 bits) per
    // allowed pixel, whatever the decoder allocates.
    bounds.max_image_width = Some(width);
    bounds.max_image_height = Some(height);
    bounds.max_alloc = Some(limits.max_pixels.saturating_mul(8).max(64 << 20));
    reader.limits(bounds);
    let mut decoder = reader.into_decoder().map_err(|e| corrupt(&e))?;
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    let mut pixels = DynamicImage::from_decoder(decoder).map_err(|e| corrupt(&e))?;
    in_time()?;
    pixels.apply_orientation(orientation);

    let stored_as = format.stored_as(pixels.color().has_alpha());
    let thumbnail =
        if pixels.width() <= limits.thumbnail_px && pixels.height() <= limits.thumbnail_px {
            pixels.clone()
        } else {
            pixels.thumbnail(limits.thumbnail_px, limits.thumbnail_px)
        };
    in_time()?;
    let image = encode(&pixels, stored_as)?;
    // What we store stays within reach of what was uploaded.
    if image.bytes.len() > limits.max_bytes.saturating_mul(4) {
        return Err(MediaError::TooLarge {
            max: limits.max_bytes,
        });
    }
    in_time()?;
    Ok(Processed {
        image,
        thumbnail: encode(&thumbnail, stored_as)?,
    })
}

fn encode(pixels: &DynamicImage, format: Format) -> Result<Encoded, MediaError> {
    let mut bytes = Vec::new();
    if format == Format::Jpeg {
        // Most photos decode as RGB already: no copy of 36 MB for a 12 MP one.
        let converted;
        let rgb = if let Some(rgb) = pixels.as_rgb8() {
            rgb
        } else {
            converted = pixels.to_rgb8();
            &converted
        };
        // A JPEG is at most 65535 on a side.
        let (Ok(width), Ok(height)) = (u16::try_from(rgb.width()), u16::try_from(rgb.height()))
        else {
            return Err(MediaError::TooManyPixels);
        };
        jpeg_encoder::Encoder::new(&mut bytes, 85)
            .encode(rgb.as_raw(), width, height, jpeg_encoder::ColorType::Rgb)
            .map_err(|e| {
                tracing::warn!(error = %e, "Could not encode a JPEG.");
                MediaError::Corrupt
            })?;
    } else {
        pixels
            .write_with_encoder(PngEncoder::new_with_quality(
                &mut bytes,
                CompressionType::Fast,
                FilterType::Adaptive,
            ))
            .map_err(|e| corrupt(&e))?;
    }
    Ok(Encoded {
        bytes,
        format,
        width: pixels.width(),
        height: pixels.height(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(format: ImageFormat, width: u32, height: u32) -> Vec<u8> {
        let pixels = DynamicImage::ImageRgb8(image::RgbImage::from_fn(width, height, |x, y| {
            image::Rgb([x.to_le_bytes()[0], y.to_le_bytes()[0], 128])
        }));
        let mut out = Cursor::new(Vec::new());
        pixels.write_to(&mut out, format).expect("encodes");
        out.into_inner()
    }

    #[test]
    fn the_content_decides_the_format() {
        for (format, expect) in [
            (ImageFormat::Jpeg, Format::Jpeg),
            (ImageFormat::Png, Format::Png),
            (ImageFormat::WebP, Format::WebP),
            (ImageFormat::Gif, Format::Gif),
        ] {
            let bytes = sample(format, 40, 30);
            assert_eq!(Format::sniff(&bytes), Some(expect));
            let done = process(&bytes, &ImageLimits::default(), None).expect("accepted");
            assert_eq!((done.image.width, done.image.height), (40, 30));
            assert_eq!(Format::sniff(&done.image.bytes), Some(done.image.format));
            assert_eq!(done.image.format, expect.stored_as(false));
        }
        assert!(matches!(
            process(b"GIF87 is not quite it", &ImageLimits::default(), None),
            Err(MediaError::Unsupported)
        ));
        assert!(matches!(
            process(b"%PDF-1.7", &ImageLimits::default(), None),
            Err(MediaError::Unsupported)
        ));
    }

    #[test]
    fn thumbnails_fit_the_box_and_keep_the_aspect() {
        let bytes = sample(ImageFormat::Png, 1000, 500);
        let done = process(&bytes, &ImageLimits::default(), None).expect("accepted");
        assert_eq!((done.thumbnail.width, done.thumbnail.height), (256, 128));
        let small = process(
            &sample(ImageFormat::Png, 10, 20),
            &ImageLimits::default(),
            None,
        )
        .expect("accepted");
        assert_eq!((small.thumbnail.width, small.thumbnail.height), (10, 20));
    }

    #[test]
    fn nothing_more_is_started_past_the_deadline() {
        let bytes = sample(ImageFormat::Png, 64, 64);
        let past = Instant::now().checked_sub(std::time::Duration::from_secs(1));
        assert!(matches!(
            process(&bytes, &ImageLimits::default(), past),
            Err(MediaError::TimedOut)
        ));
    }

    #[test]
    fn limits_are_checked_before_decoding() {
        let bytes = sample(ImageFormat::Png, 300, 300);
        let limits = ImageLimits {
            max_pixels: 300 * 299,
            ..ImageLimits::default()
        };
        assert!(matches!(
            process(&bytes, &limits, None),
            Err(MediaError::TooManyPixels)
        ));
        let limits = ImageLimits {
            max_bytes: bytes.len() - 1,
            ..ImageLimits::default()
        };
        assert!(matches!(
            process(&bytes, &limits, None),
            Err(MediaError::TooLarge { .. })
        ));
        // Truncated: accepted by its magic, refused by the decoder, without a panic.
        let cut = &sample(ImageFormat::Jpeg, 64, 64)[..200];
        assert!(matches!(
            process(cut, &ImageLimits::default(), None),
            Err(MediaError::Corrupt)
        ));
    }
}

//! Image uploads as a client sends them, shared by the tests (`tests/it/media.rs`) and the
//! load tool (`realtime_load.rs --uploads`): a multipart/form-data body, and a photo-like
//! JPEG (noise, so it compresses like a photo rather than a flat gradient).

/// A multipart/form-data body with text `fields` and, if given, a `file` part
/// `(filename, content type, bytes)`: returns `(content type header, body)`.
pub fn form(file: Option<(&str, &str, &[u8])>, fields: &[(&str, &str)]) -> (String, Vec<u8>) {
    let boundary = "confab-form-boundary-7MA4YWxkTrZu0gW";
    let mut body = Vec::new();
    for (name, value) in fields {
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
            )
            .as_bytes(),
        );
    }
    if let Some((filename, content_type, bytes)) = file {
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\nContent-Type: {content_type}\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// A `width` × `height` JPEG (quality 90) of smooth colour with per-pixel noise: about the
/// size a phone photo of that many pixels has.
pub fn photo_jpeg(width: u32, height: u32) -> Vec<u8> {
    let mut state = 0x9E37_79B9_u32;
    let pixels = image::RgbImage::from_fn(width, height, |x, y| {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let noise = state.to_le_bytes();
        let base = [
            (x * 255 / width.max(1)).to_le_bytes()[0],
            (y * 255 / height.max(1)).to_le_bytes()[0],
            ((x + y) / 16).to_le_bytes()[0],
        ];
        image::Rgb([
            base[0].wrapping_add(noise[0] % 24),
            base[1].wrapping_add(noise[1] % 24),
            base[2].wrapping_add(noise[2] % 24),
        ])
    });
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)
        .encode_image(&pixels)
        .expect("a JPEG encodes");
    out
}

//! Media (SPEC §3 "Media", §11 uploads), driven over HTTP and Socket.IO the way a client
//! does: image messages and avatars in every accepted format, refusals by content (not by
//! name), size and pixel limits, metadata stripped, signed URLs and who may use them,
//! conditional GET, idempotent retries, and deletion through the `events` worker. Each case
//! runs on local disk and on the S3 peer (`TEST_S3_ENDPOINT`).

use std::io::Cursor;
use std::time::Duration;

use confab_core::ports::blob::BlobKey;
use confab_core::testing::{eventually, service_url, unique};
use confab_server::config::{Config, MediaConfig};
use image::{DynamicImage, ImageFormat};
use reqwest::Method;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::auth::{Backend, Person, auth_app, call, person};
use crate::helpers::TestApp;
use crate::live::{get_json, group};
use crate::sio;
use crate::upload::form;

const WAIT: Duration = Duration::from_secs(20);

/// Where media objects live in a test.
pub enum Storage {
    Local,
    S3(String),
}

impl Storage {
    fn s3() -> Option<Self> {
        service_url("TEST_S3_ENDPOINT", "media on the S3 peer").map(Self::S3)
    }

    async fn app(&self, configure: impl FnOnce(&mut Config)) -> TestApp {
        let media = match self {
            Self::Local => MediaConfig::default(),
            Self::S3(endpoint) => s3_bucket(endpoint).await,
        };
        auth_app(&Backend::EMBEDDED, |c| {
            c.media = media;
            configure(c);
        })
        .await
    }
}

/// A bucket of its own on the S3 peer.
async fn s3_bucket(endpoint: &str) -> MediaConfig {
    let bucket = unique("confab-media-").to_lowercase();
    let created = reqwest::Client::new()
        .put(format!("{endpoint}/{bucket}"))
        .send()
        .await
        .unwrap();
    assert!(created.status().is_success(), "{}", created.status());
    MediaConfig::S3 {
        bucket,
        region: Some("us-east-1".into()),
        endpoint: Some(endpoint.to_owned()),
        access_key_id: Some("test".into()),
        secret_access_key: Some(confab_core::settings::Secret::new("test")),
    }
}

/// An image of `width` × `height` in `format`, with a gradient (so thumbnails differ).
pub fn picture(format: ImageFormat, width: u32, height: u32) -> Vec<u8> {
    let pixels = DynamicImage::ImageRgb8(image::RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([(x * 7).to_le_bytes()[0], (y * 5).to_le_bytes()[0], 90])
    }));
    let mut out = Cursor::new(Vec::new());
    pixels.write_to(&mut out, format).unwrap();
    out.into_inner()
}

/// A JPEG whose EXIF says: rotate 90° clockwise to show it (orientation 6), taken at a GPS
/// latitude, described as `marker`.
fn jpeg_with_exif(width: u32, height: u32, marker: &str) -> Vec<u8> {
    fn entry(out: &mut Vec<u8>, tag: u16, kind: u16, count: u32, value: [u8; 4]) {
        out.extend_from_slice(&tag.to_be_bytes());
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(&count.to_be_bytes());
        out.extend_from_slice(&value);
    }
    let mut description = marker.as_bytes().to_vec();
    description.push(0);
    if description.len() % 2 == 1 {
        description.push(0);
    }
    let ifd0_at = 8u32;
    let description_at = ifd0_at + 2 + 3 * 12 + 4;
    let gps_at = description_at + u32::try_from(description.len()).unwrap();
    let rationals_at = gps_at + 2 + 2 * 12 + 4;
    let mut tiff = b"MM\0\x2a".to_vec();
    tiff.extend_from_slice(&ifd0_at.to_be_bytes());
    tiff.extend_from_slice(&3u16.to_be_bytes());
    entry(
        &mut tiff,
        0x010E,
        2,
        u32::try_from(marker.len()).unwrap() + 1,
        description_at.to_be_bytes(),
    );
    entry(&mut tiff, 0x0112, 3, 1, [0, 6, 0, 0]);
    entry(&mut tiff, 0x8825, 4, 1, gps_at.to_be_bytes());
    tiff.extend_from_slice(&0u32.to_be_bytes());
    tiff.extend_from_slice(&description);
    tiff.extend_from_slice(&2u16.to_be_bytes());
    entry(&mut tiff, 0x0001, 2, 2, *b"N\0\0\0");
    entry(&mut tiff, 0x0002, 5, 3, rationals_at.to_be_bytes());
    tiff.extend_from_slice(&0u32.to_be_bytes());
    for value in [48u32, 51, 29] {
        tiff.extend_from_slice(&value.to_be_bytes());
        tiff.extend_from_slice(&1u32.to_be_bytes());
    }
    let mut app1 = vec![0xFF, 0xE1];
    app1.extend_from_slice(&(2 + 6 + u16::try_from(tiff.len()).unwrap()).to_be_bytes());
    app1.extend_from_slice(b"Exif\0\0");
    app1.extend_from_slice(&tiff);
    let jpeg = picture(ImageFormat::Jpeg, width, height);
    let mut out = jpeg[..2].to_vec();
    out.extend_from_slice(&app1);
    out.extend_from_slice(&jpeg[2..]);
    out
}

async fn upload(
    app: &TestApp,
    who: &Person,
    method: Method,
    path: &str,
    (content_type, body): (String, Vec<u8>),
) -> (u16, Value) {
    let response = app
        .client
        .request(method, app.url(path))
        .bearer_auth(&who.token)
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn send_image(
    app: &TestApp,
    who: &Person,
    chat: &str,
    (filename, content_type, bytes): (&str, &str, &[u8]),
    fields: &[(&str, &str)],
) -> (u16, Value) {
    upload(
        app,
        who,
        Method::POST,
        &format!("/api/v1/chats/{chat}/messages/image"),
        form(Some((filename, content_type, bytes)), fields),
    )
    .await
}

async fn put_avatar(app: &TestApp, who: &Person, file: (&str, &str, &[u8])) -> (u16, Value) {
    let body = form(Some(file), &[]);
    upload(app, who, Method::PUT, "/api/v1/users/me/avatar", body).await
}

/// The chat's messages as `who` lists them (newest first).
async fn history(app: &TestApp, who: &Person, chat: &str) -> Value {
    let path = format!("/api/v1/chats/{chat}/messages");
    let response = call(app, Method::GET, &path, Some(&who.token), None).await;
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

/// GETs a media URL as handed out (ours are relative to the API, S3's absolute).
async fn fetch(app: &TestApp, url: &str, token: Option<&str>) -> reqwest::Response {
    let absolute = if url.starts_with('/') {
        app.url(url)
    } else {
        url.to_owned()
    };
    let mut request = app.client.get(absolute);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.unwrap()
}

fn decoded(bytes: &[u8]) -> DynamicImage {
    image::load_from_memory(bytes).expect("the stored image decodes")
}

/// The keys stored under `prefix`.
async fn objects(app: &TestApp, prefix: &str) -> Vec<String> {
    app.state
        .blobs
        .list(&BlobKey::parse(prefix).unwrap())
        .await
        .unwrap()
        .into_iter()
        .map(|meta| meta.key.to_string())
        .collect()
}

/// The key part of one of our media URLs or a presigned one.
fn key_of(url: &str, bucket_or_api: &str) -> String {
    let path = url.split('?').next().unwrap();
    let (_, key) = path.split_once(bucket_or_api).unwrap();
    key.trim_start_matches('/').to_owned()
}

async fn each_format_round_trips_and_members_see_it_live(storage: &Storage) {
    let app = storage.app(|_| {}).await;
    let (ann, bob) = (person(&app, "ann").await, person(&app, "bob").await);
    let chat = group(&app, &ann, &[&bob]).await;
    let (socket, mut events) = sio::connect(&app.url(""), &json!({ "token": bob.token }))
        .await
        .unwrap();
    let joined = socket
        .call("chat:join", &json!({ "chatId": chat }), WAIT)
        .await
        .unwrap();
    assert_eq!(joined["ok"], true, "{joined}");

    // What the name and the declared type say does not matter: a PNG named .jpg is a PNG.
    let cases = [
        (ImageFormat::Jpeg, "photo.jpg", "image/jpeg", "image/jpeg"),
        (ImageFormat::Png, "photo.jpg", "image/jpeg", "image/png"),
        (
            ImageFormat::WebP,
            "sticker.webp",
            "application/octet-stream",
            "image/jpeg",
        ),
        (ImageFormat::Gif, "funny.gif", "image/gif", "image/png"),
    ];
    for (format, filename, declared, stored) in cases {
        let bytes = picture(format, 640, 480);
        let (status, message) = send_image(
            &app,
            &ann,
            &chat,
            (filename, declared, &bytes),
            &[("caption", "look"), ("clientId", &unique("img"))],
        )
        .await;
        assert_eq!(status, 201, "{format:?}: {message}");
        assert_eq!(message["kind"], "image");
        assert_eq!(message["text"], "look");
        let image = &message["image"];
        assert_eq!(image["width"], 640, "{message}");
        assert_eq!(image["height"], 480);
        assert_eq!(image["contentType"], stored);

        let full = fetch(&app, image["url"].as_str().unwrap(), None).await;
        assert_eq!(full.status(), 200, "{format:?} {}", image["url"]);
        // Ours names the type; S3 serves the type the object was stored with.
        assert_eq!(full.headers()["content-type"], stored);
        let full = decoded(&full.bytes().await.unwrap());
        assert_eq!((full.width(), full.height()), (640, 480));
        let thumb = fetch(&app, image["thumbnailUrl"].as_str().unwrap(), None).await;
        assert_eq!(thumb.status(), 200);
        let thumb = decoded(&thumb.bytes().await.unwrap());
        assert_eq!((thumb.width(), thumb.height()), (256, 192));

        // Broadcast like any message, with URLs the member can use.
        let live = sio::next_named(&mut events, "message:new", WAIT)
            .await
            .expect("the member gets the image message");
        assert_eq!(live.data["id"], message["id"]);
        assert_eq!(live.data["image"]["contentType"], stored);
        let live_url = live.data["image"]["thumbnailUrl"].as_str().unwrap();
        assert_eq!(fetch(&app, live_url, None).await.status(), 200);
    }
    // A phone photo beyond the JSON body limit (1 MiB), within the upload limit.
    let photo = crate::upload::photo_jpeg(2400, 1800);
    assert!(photo.len() > 1024 * 1024, "{}", photo.len());
    let (status, message) = send_image(
        &app,
        &ann,
        &chat,
        ("IMG_0001.JPG", "image/jpeg", &photo),
        &[],
    )
    .await;
    assert_eq!(status, 201, "{message}");
    assert_eq!(message["image"]["width"], 2400);
    let live = sio::next_named(&mut events, "message:new", WAIT).await;
    assert_eq!(live.expect("the photo too").data["id"], message["id"]);

    // The history carries them too, newest first.
    let page = history(&app, &bob, &chat).await;
    let items = page["items"].as_array().unwrap();
    assert_eq!(items.len(), 5);
    assert!(
        items.iter().all(|m| m["image"]["url"].is_string()),
        "{page}"
    );
    // Five images, each with its thumbnail.
    assert_eq!(objects(&app, &format!("chats/{chat}")).await.len(), 10);
}

async fn uploads_are_judged_by_content_and_limits_hold(storage: &Storage) {
    let app = storage.app(|c| c.uploads.max_bytes = 256 * 1024).await;
    let (ann, bob, eve) = (
        person(&app, "ann").await,
        person(&app, "bob").await,
        person(&app, "eve").await,
    );
    let chat = group(&app, &ann, &[&bob]).await;
    let refused = |status: u16, body: &Value, code: &str| {
        assert_eq!(body["code"], code, "{status} {body}");
    };

    // A text file dressed as a PNG.
    let (status, body) = send_image(
        &app,
        &ann,
        &chat,
        ("cat.png", "image/png", b"just some text, honestly"),
        &[],
    )
    .await;
    assert_eq!(status, 415, "{body}");
    refused(status, &body, "UNSUPPORTED_MEDIA_TYPE");

    // Larger than the limit by a byte (inside the multipart allowance): refused while
    // reading. (A body far beyond the limit is refused before it is read:
    // `an_oversized_body_is_refused_without_being_read`. Through an HTTP client that is still
    // sending, that early answer races the connection's reset, so it is tested on a raw
    // socket.)
    let big = vec![0xFF; 256 * 1024 + 1];
    let (status, body) = send_image(&app, &ann, &chat, ("big.jpg", "image/jpeg", &big), &[]).await;
    assert_eq!(status, 413, "{body}");
    refused(status, &body, "PAYLOAD_TOO_LARGE");

    // Decompression bombs: tiny files whose headers declare 65535 × 65535 pixels.
    let mut gif = picture(ImageFormat::Gif, 8, 8);
    gif[6..10].copy_from_slice(&[0xFF, 0xFF, 0xFF, 0xFF]);
    let mut jpeg = picture(ImageFormat::Jpeg, 8, 8);
    let sof = jpeg
        .windows(2)
        .position(|w| w == [0xFF, 0xC0])
        .expect("a baseline JPEG has SOF0");
    jpeg[sof + 5..sof + 9].copy_from_slice(&[0xFF, 0xFF, 0xFF, 0xFF]);
    for (name, bomb) in [("bomb.gif", gif), ("bomb.jpg", jpeg)] {
        assert!(bomb.len() < 4096);
        let (status, body) = send_image(&app, &ann, &chat, (name, "image/gif", &bomb), &[]).await;
        assert_eq!(status, 413, "{name}: {body}");
        refused(status, &body, "PAYLOAD_TOO_LARGE");
    }

    // Cut short: accepted by its magic bytes, refused by the decoder.
    let cut = &picture(ImageFormat::Jpeg, 64, 64)[..300];
    let (status, body) = send_image(&app, &ann, &chat, ("cut.jpg", "image/jpeg", cut), &[]).await;
    assert_eq!(status, 400, "{body}");
    refused(status, &body, "VALIDATION_ERROR");

    // No file; not multipart at all; a non-member.
    let (status, body) = upload(
        &app,
        &ann,
        Method::POST,
        &format!("/api/v1/chats/{chat}/messages/image"),
        form(None, &[("caption", "where is it")]),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let response = call(
        &app,
        Method::POST,
        &format!("/api/v1/chats/{chat}/messages/image"),
        Some(&ann.token),
        Some(json!({"file": "nope"})),
    )
    .await;
    assert_eq!(response.status(), 415);
    let png = picture(ImageFormat::Png, 16, 16);
    let (status, body) = send_image(&app, &eve, &chat, ("a.png", "image/png", &png), &[]).await;
    assert_eq!(status, 404, "{body}");

    // Nothing of all that was stored.
    assert!(objects(&app, &format!("chats/{chat}")).await.is_empty());
    let page = history(&app, &ann, &chat).await;
    assert_eq!(page["items"].as_array().unwrap().len(), 0, "{page}");
}

/// Declares 100 MB and waits, as a client does with `Expect: 100-continue`: the server answers
/// 413 from the headers, without asking for (let alone buffering) a byte of the body. (A
/// client that sends anyway gets the same answer, but then it races the reset of the
/// connection the server closes with the body unread: a plain HTTP/1.1 limitation.)
async fn an_oversized_body_is_refused_without_being_read(storage: &Storage) {
    let app = storage.app(|c| c.uploads.max_bytes = 256 * 1024).await;
    let (ann, bob) = (person(&app, "ann").await, person(&app, "bob").await);
    let chat = group(&app, &ann, &[&bob]).await;
    let mut stream = tokio::net::TcpStream::connect(app.address).await.unwrap();
    let head = format!(
        "POST /api/v1/chats/{chat}/messages/image HTTP/1.1\r\nHost: confab\r\nAuthorization: Bearer {}\r\nContent-Type: multipart/form-data; boundary=x\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        ann.token,
        100 * 1024 * 1024
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let mut buffer = vec![0; 4096];
    while !String::from_utf8_lossy(&answer).contains("PAYLOAD_TOO_LARGE") {
        let n = tokio::time::timeout(WAIT, stream.read(&mut buffer))
            .await
            .expect("answered without the body")
            .unwrap();
        assert!(
            n > 0,
            "closed without an answer: {}",
            String::from_utf8_lossy(&answer)
        );
        answer.extend_from_slice(&buffer[..n]);
    }
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 413"),
        "no 100 Continue, a 413: {answer}"
    );
}

async fn metadata_is_stripped_and_the_orientation_applied(storage: &Storage) {
    let app = storage.app(|_| {}).await;
    let (ann, bob) = (person(&app, "ann").await, person(&app, "bob").await);
    let chat = group(&app, &ann, &[&bob]).await;
    let marker = "confab-secret-place-48N";
    let bytes = jpeg_with_exif(120, 60, marker);
    assert!(bytes.windows(marker.len()).any(|w| w == marker.as_bytes()));
    let (status, message) =
        send_image(&app, &ann, &chat, ("gps.jpg", "image/jpeg", &bytes), &[]).await;
    assert_eq!(status, 201, "{message}");
    // Orientation 6: shown rotated, so 60 × 120.
    assert_eq!(message["image"]["width"], 60, "{message}");
    assert_eq!(message["image"]["height"], 120);
    for url in [&message["image"]["url"], &message["image"]["thumbnailUrl"]] {
        let stored = fetch(&app, url.as_str().unwrap(), None)
            .await
            .bytes()
            .await
            .unwrap();
        for needle in [
            marker.as_bytes(),
            b"Exif".as_slice(),
            b"MM\0\x2a".as_slice(),
        ] {
            assert!(
                !stored.windows(needle.len()).any(|w| w == needle),
                "{:?} survived",
                String::from_utf8_lossy(needle)
            );
        }
        let image = decoded(&stored);
        assert_eq!((image.width(), image.height()), (60, 120));
    }
}

async fn media_urls_work_only_for_those_allowed(storage: &Storage) {
    let app = storage.app(|_| {}).await;
    let (ann, bob, eve) = (
        person(&app, "ann").await,
        person(&app, "bob").await,
        person(&app, "eve").await,
    );
    let chat = group(&app, &ann, &[&bob]).await;
    let png = picture(ImageFormat::Png, 300, 300);
    let (status, message) = send_image(&app, &ann, &chat, ("a.png", "image/png", &png), &[]).await;
    assert_eq!(status, 201, "{message}");
    let url = message["image"]["url"].as_str().unwrap();
    let key = match storage {
        Storage::Local => key_of(url, "/api/v1/media"),
        Storage::S3(_) => {
            assert!(
                url.contains("X-Amz-Signature="),
                "a presigned S3 URL: {url}"
            );
            let bucket_path = url.split('?').next().unwrap();
            // http://host/bucket/key…: the key starts at `chats/`.
            bucket_path[bucket_path.find("chats/").unwrap()..].to_owned()
        }
    };
    let key = BlobKey::parse(&key).unwrap();
    // Our own signed URL works on every shape (on S3 it is served through us).
    let ours = app.state.media.own_url(&key);
    let fetched = fetch(&app, &ours, None).await;
    assert_eq!(fetched.status(), 200);
    assert_eq!(fetched.headers()["content-type"], "image/png");
    let etag = fetched.headers()["etag"].to_str().unwrap().to_owned();
    assert!(
        fetched.headers()["cache-control"]
            .to_str()
            .unwrap()
            .starts_with("private, max-age=")
    );
    let original = fetched.bytes().await.unwrap();
    // The thumbnail, by `w`.
    let thumb = fetch(&app, &format!("{ours}&w=256"), None).await;
    assert_eq!(thumb.status(), 200);
    let thumb = decoded(&thumb.bytes().await.unwrap());
    assert_eq!((thumb.width(), thumb.height()), (256, 256));

    // Conditional GET.
    let again = app
        .client
        .get(app.url(&ours))
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 304);
    assert!(again.bytes().await.unwrap().is_empty());

    // A tampered signature, another key under the same signature, an expired one: 404.
    let sig_at = ours.find("sig=").unwrap() + 4;
    let mut tampered = ours.clone();
    let flipped = if &ours[sig_at..=sig_at] == "A" {
        "B"
    } else {
        "A"
    };
    tampered.replace_range(sig_at..=sig_at, flipped);
    let other_key = ours.replace("image.png", "w256.png");
    let past = app
        .state
        .media
        .signed_url(&key, chrono::Utc::now().timestamp() - 1);
    let far = ours.replace("exp=", "exp=9");
    let garbled = ours.replace("exp=", "exp=x");
    let huge = ours.replace("exp=", "exp=99999999999999999999");
    for bad in [&tampered, &other_key, &past, &far, &garbled, &huge] {
        let response = fetch(&app, bad, None).await;
        assert_eq!(response.status(), 404, "{bad}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["code"], "NOT_FOUND");
    }

    // By token: a member yes; a non-member, a bad token, or nobody: 404.
    let plain = format!("/api/v1/media/{key}");
    let member = fetch(&app, &plain, Some(&bob.token)).await;
    assert_eq!(member.status(), 200);
    assert_eq!(member.headers()["cache-control"], "private, no-cache");
    assert_eq!(member.bytes().await.unwrap(), original);
    for token in [Some(eve.token.as_str()), Some("not-a-token"), None] {
        assert_eq!(fetch(&app, &plain, token).await.status(), 404);
    }
    // A `w` that is not a number is no thumbnail.
    let odd = fetch(&app, &format!("{plain}?w=wide"), Some(&bob.token)).await;
    assert_eq!(odd.bytes().await.unwrap(), original);
    // A member removed from the chat is no longer let in by token.
    let removed = call(
        &app,
        Method::DELETE,
        &format!("/api/v1/chats/{chat}/members/{}", bob.id),
        Some(&ann.token),
        None,
    )
    .await;
    assert_eq!(removed.status(), 204);
    assert_eq!(fetch(&app, &plain, Some(&bob.token)).await.status(), 404);
    // Keys that are not ours, or do not exist.
    for path in [
        "/api/v1/media/secrets/x.png".to_owned(),
        "/api/v1/media/..%2F..%2Fetc%2Fpasswd".to_owned(),
        format!("/api/v1/media/chats/{chat}/missing/image.png"),
    ] {
        assert_eq!(
            fetch(&app, &path, Some(&ann.token)).await.status(),
            404,
            "{path}"
        );
    }
}

async fn a_retried_upload_is_one_message_and_deletion_removes_the_objects(storage: &Storage) {
    let app = storage.app(|_| {}).await;
    let (ann, bob) = (person(&app, "ann").await, person(&app, "bob").await);
    let chat = group(&app, &ann, &[&bob]).await;
    let jpeg = picture(ImageFormat::Jpeg, 400, 300);
    let fields = [("clientId", "retry-1"), ("caption", "once")];
    let (first, message) =
        send_image(&app, &ann, &chat, ("a.jpg", "image/jpeg", &jpeg), &fields).await;
    assert_eq!(first, 201, "{message}");
    let (again, retried) =
        send_image(&app, &ann, &chat, ("a.jpg", "image/jpeg", &jpeg), &fields).await;
    assert_eq!(again, 200, "{retried}");
    assert_eq!(retried["id"], message["id"]);
    assert!(retried["image"]["url"].is_string());
    let prefix = format!("chats/{chat}");
    assert_eq!(objects(&app, &prefix).await.len(), 2);

    // Two tabs retrying at once: one message; the losing upload's objects are deleted.
    let race = [("clientId", "race-1")];
    let (a, b) = tokio::join!(
        send_image(&app, &ann, &chat, ("b.jpg", "image/jpeg", &jpeg), &race),
        send_image(&app, &ann, &chat, ("b.jpg", "image/jpeg", &jpeg), &race),
    );
    let mut statuses = [a.0, b.0];
    statuses.sort_unstable();
    assert!(
        statuses == [200, 201] || statuses == [201, 201] && a.1["id"] == b.1["id"],
        "{a:?} {b:?}"
    );
    assert_eq!(a.1["id"], b.1["id"], "one message");
    assert_eq!(
        objects(&app, &prefix).await.len(),
        4,
        "two images, no orphan"
    );
    let raced = a.1["id"].as_str().unwrap();
    let raced = format!("/api/v1/chats/{chat}/messages/{raced}");
    let response = call(&app, Method::DELETE, &raced, Some(&ann.token), None).await;
    assert_eq!(response.status(), 200);

    // Only the sender deletes; the tombstone has no image, and the objects go (via the
    // events worker).
    let id = message["id"].as_str().unwrap();
    let path = format!("/api/v1/chats/{chat}/messages/{id}");
    let response = call(&app, Method::DELETE, &path, Some(&bob.token), None).await;
    assert_eq!(response.status(), 403);
    let response = call(&app, Method::DELETE, &path, Some(&ann.token), None).await;
    assert_eq!(response.status(), 200);
    let tombstone: Value = response.json().await.unwrap();
    assert!(tombstone.get("image").is_none(), "{tombstone}");
    assert!(tombstone["deletedAt"].is_string());
    eventually("the image objects are deleted", WAIT, || async {
        objects(&app, &prefix).await.is_empty()
    })
    .await;
    let url = message["image"]["url"].as_str().unwrap();
    assert_eq!(fetch(&app, url, Some(&ann.token)).await.status(), 404);
    // The history shows the tombstone, with nothing of the picture.
    let page = history(&app, &bob, &chat).await;
    let tomb = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == message["id"])
        .expect("the tombstone stays in the history");
    assert!(
        tomb.get("image").is_none() && tomb["text"].is_null(),
        "{tomb}"
    );
    // And a retry of the deleted upload gets the tombstone, not a new image.
    let (status, retried) =
        send_image(&app, &ann, &chat, ("a.jpg", "image/jpeg", &jpeg), &fields).await;
    assert_eq!(status, 200, "{retried}");
    assert!(retried.get("image").is_none(), "{retried}");
    assert!(objects(&app, &prefix).await.is_empty());
}

async fn avatars_are_shown_to_everyone_signed_in_and_go_with_the_account(storage: &Storage) {
    let app = storage.app(|_| {}).await;
    let (ann, bob) = (person(&app, "ann").await, person(&app, "bob").await);
    let first = picture(ImageFormat::Png, 600, 400);
    let (status, body) = put_avatar(&app, &ann, ("me.png", "image/png", &first)).await;
    assert_eq!(status, 200, "{body}");
    let avatar_url = body["avatarUrl"].as_str().unwrap().to_owned();
    let fetched = fetch(&app, &avatar_url, None).await;
    assert_eq!(fetched.status(), 200);
    assert_eq!(decoded(&fetched.bytes().await.unwrap()).width(), 600);

    let me = get_json(&app, "/api/v1/users/me", &ann.token).await;
    assert!(me["avatarUrl"].is_string(), "{me}");
    let profile = get_json(&app, &format!("/api/v1/users/{}", ann.id), &bob.token).await;
    let seen_by_bob = profile["avatarUrl"].as_str().unwrap();
    assert_eq!(fetch(&app, seen_by_bob, None).await.status(), 200);
    // Anyone signed in, by token.
    let prefix = format!("avatars/{}", ann.id);
    let stored = objects(&app, &prefix).await;
    assert_eq!(stored.len(), 2, "{stored:?}");
    let plain = format!("/api/v1/media/{}", stored[0]);
    assert_eq!(fetch(&app, &plain, Some(&bob.token)).await.status(), 200);
    assert_eq!(fetch(&app, &plain, None).await.status(), 404);

    // A new avatar: the old objects go.
    let second = picture(ImageFormat::Jpeg, 100, 100);
    let (status, body) = put_avatar(&app, &ann, ("me.jpg", "image/jpeg", &second)).await;
    assert_eq!(status, 200, "{body}");
    eventually("the old avatar is deleted", WAIT, || async {
        let now = objects(&app, &prefix).await;
        now.len() == 2 && now.iter().all(|k| !stored.contains(k))
    })
    .await;

    // A text file is still refused here.
    let svg = b"<svg onload=alert(1)>";
    let (status, _) = put_avatar(&app, &ann, ("me.png", "image/png", svg)).await;
    assert_eq!(status, 415);

    // Deleting the account deletes its avatar.
    let response = call(
        &app,
        Method::DELETE,
        "/api/v1/users/me",
        Some(&ann.token),
        None,
    )
    .await;
    assert!(response.status().is_success(), "{}", response.status());
    eventually("the avatar goes with the account", WAIT, || async {
        objects(&app, &prefix).await.is_empty()
    })
    .await;
}

async fn each_user_has_an_upload_rate(storage: &Storage) {
    let app = storage.app(|c| c.uploads.per_user_per_minute = 2).await;
    let (ann, bob) = (person(&app, "ann").await, person(&app, "bob").await);
    let png = picture(ImageFormat::Png, 32, 32);
    for _ in 0..2 {
        let (status, body) = put_avatar(&app, &ann, ("me.png", "image/png", &png)).await;
        assert_eq!(status, 200, "{body}");
    }
    let chat = group(&app, &ann, &[&bob]).await;
    let (content_type, body) = form(Some(("a.png", "image/png", &png)), &[]);
    let response = app
        .client
        .post(app.url(&format!("/api/v1/chats/{chat}/messages/image")))
        .bearer_auth(&ann.token)
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        429,
        "image messages and avatars count together"
    );
    assert!(response.headers().contains_key("retry-after"));
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "RATE_LIMITED");
    // Another user is not held up.
    let (status, _) = put_avatar(&app, &bob, ("me.png", "image/png", &png)).await;
    assert_eq!(status, 200);
}

macro_rules! on_every_store {
    ($($case:ident),* $(,)?) => {
        mod local_disk {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(&super::Storage::Local).await;
                }
            )*
        }

        mod s3 {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let Some(storage) = super::Storage::s3() else {
                        return;
                    };
                    super::$case(&storage).await;
                }
            )*
        }
    };
}

on_every_store!(
    each_format_round_trips_and_members_see_it_live,
    uploads_are_judged_by_content_and_limits_hold,
    an_oversized_body_is_refused_without_being_read,
    metadata_is_stripped_and_the_orientation_applied,
    media_urls_work_only_for_those_allowed,
    a_retried_upload_is_one_message_and_deletion_removes_the_objects,
    avatars_are_shown_to_everyone_signed_in_and_go_with_the_account,
    each_user_has_an_upload_rate,
);

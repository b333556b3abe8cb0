//! Building blocks of configuration shared by the server and the adapters (each adapter's
//! config struct lives beside it, STYLE §2).
//!
//! Values that must never be printed: [`Secret`] and [`SecretUrl`]. Both redact themselves in `Debug`, `Display` and `Serialize`, so printing the whole
//! configuration (`confab config check`, the startup log line) cannot leak them. The only way
//! to the value is [`Secret::expose`] / [`SecretUrl::expose`], which is easy to grep for.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

/// What a redacted value prints as.
pub const REDACTED: &str = "[redacted]";

/// A secret string (a key, a password, a token).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself. Never log what this returns.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(REDACTED)
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // Environment values such as `EMAIL_PASS=12345678` arrive as numbers from some
        // sources; a secret is whatever characters were given.
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = Secret;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Secret, E> {
                Ok(Secret::new(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Secret, E> {
                Ok(Secret::new(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Secret, E> {
                Ok(Secret::new(v.to_string()))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// A service URL that may carry credentials (`postgres://user:pass@host/db`).
///
/// It is checked to be a URL when read; printed, it keeps scheme, user, host and path (an
/// operator needs to see *which* server) and replaces the password and any credential-like
/// query parameter with a marker.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl(url::Url);

impl SecretUrl {
    pub fn parse(value: &str) -> Result<Self, url::ParseError> {
        url::Url::parse(value).map(Self)
    }

    /// The URL with its credentials. Never log what this returns.
    pub fn expose(&self) -> &url::Url {
        &self.0
    }

    pub fn scheme(&self) -> &str {
        self.0.scheme()
    }

    /// The URL as safe to print.
    pub fn redacted(&self) -> String {
        let mut url = self.0.clone();
        if url.password().is_some() {
            // Only fails for URLs that cannot have credentials, which this one has.
            let _ = url.set_password(Some("redacted"));
        }
        if url.query().is_some() {
            let pairs: Vec<(String, String)> = url
                .query_pairs()
                .map(|(k, v)| {
                    let sensitive = ["pass", "secret", "token", "key", "auth"]
                        .iter()
                        .any(|word| k.to_ascii_lowercase().contains(word));
                    let v = if sensitive {
                        "redacted".into()
                    } else {
                        v.into_owned()
                    };
                    (k.into_owned(), v)
                })
                .collect();
            url.query_pairs_mut().clear().extend_pairs(pairs);
        }
        url.to_string()
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl Serialize for SecretUrl {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.redacted())
    }
}

impl<'de> Deserialize<'de> for SecretUrl {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(deserializer)?;
        // The parser's message never contains the input, so nothing leaks through it.
        Self::parse(&raw).map_err(|e| de::Error::custom(format!("not a valid URL ({e})")))
    }
}

/// Numbers and booleans inside `kind`-tagged sections.
///
/// serde buffers the content of an internally tagged enum before it picks the variant, which
/// bypasses figment's conversion of environment strings (`EMAIL_PORT=587`) to numbers; these
/// accept either form. Use them on every non-string field of a tagged section.
pub mod lenient {
    use std::fmt::Display;
    use std::str::FromStr;

    use serde::{Deserialize, Deserializer, de};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw<T> {
        Typed(T),
        Text(String),
    }

    fn convert<T, E>(raw: Raw<T>) -> Result<T, E>
    where
        T: FromStr,
        T::Err: Display,
        E: de::Error,
    {
        match raw {
            Raw::Typed(v) => Ok(v),
            Raw::Text(s) => s
                .trim()
                .parse()
                .map_err(|e| E::custom(format!("{s:?} is not valid here ({e})"))),
        }
    }

    pub fn value<'de, D, T>(deserializer: D) -> Result<T, D::Error>
    where
        D: Deserializer<'de>,
        T: FromStr + Deserialize<'de>,
        T::Err: Display,
    {
        convert(Raw::deserialize(deserializer)?)
    }

    pub fn option<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
    where
        D: Deserializer<'de>,
        T: FromStr + Deserialize<'de>,
        T::Err: Display,
    {
        Ok(Some(convert(Raw::deserialize(deserializer)?)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_never_prints_its_value() {
        let s = Secret::new("hunter2-hunter2");
        assert_eq!(format!("{s} {s:?}"), "[redacted] [redacted]");
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"[redacted]\"");
        assert_eq!(s.expose(), "hunter2-hunter2");
    }

    #[test]
    fn a_url_keeps_its_host_and_hides_its_password_and_credential_parameters() {
        let u = SecretUrl::parse(
            "postgres://app:s3cr3t@db.internal:5432/chat?sslmode=require&password=p2",
        )
        .unwrap();
        let shown = u.redacted();
        assert!(
            !shown.contains("s3cr3t") && !shown.contains("p2"),
            "{shown}"
        );
        assert!(
            shown.contains("app:redacted@db.internal:5432/chat"),
            "{shown}"
        );
        assert!(shown.contains("sslmode=require"), "{shown}");
        assert_eq!(format!("{u:?}"), shown);
    }
}

//! Access tokens: JWTs signed with HS256 (the shared secret) or, when a key pair is
//! configured, RS256 or EdDSA (then the public key is published as a JWK set).
//!
//! Verification pins the algorithm (a token claiming `none` or any other algorithm is
//! refused), requires our `kid`, issuer and audience, and allows a configured clock skew.

use std::time::Duration;

use aws_lc_rs::digest;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header};
use serde::{Deserialize, Serialize};

use crate::domain::{RefreshFamilyId, UserId};

const ISSUER: &str = "confab";
const AUDIENCE: &str = "confab";

/// What signs access tokens.
#[derive(Clone)]
pub enum SigningKey {
    /// HMAC-SHA256 with a shared secret.
    Hs256(Vec<u8>),
    /// RSA (PKCS#1 or PKCS#8 PEM private key).
    Rs256(Vec<u8>),
    /// Ed25519 (PKCS#8 PEM private key).
    EdDsa(Vec<u8>),
}

#[derive(Debug, thiserror::Error)]
#[error("the signing key cannot be used: {0}")]
pub struct KeyError(String);

/// The claims of an access token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub sub: UserId,
    /// The sign-in (refresh-token family) this token came from.
    pub sid: RefreshFamilyId,
    pub iat: i64,
    /// `iat` in milliseconds: ending a user's sessions cuts off the tokens issued before that
    /// moment, and a new sign-in in the same second must not be cut off with them.
    #[serde(default)]
    pub ims: i64,
    pub exp: i64,
    pub iss: String,
    pub aud: String,
}

/// A token that is not valid; why is not told.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the access token is not valid")]
pub struct InvalidToken;

/// Signs and verifies access tokens.
#[derive(Clone)]
pub struct AccessTokens {
    header: Header,
    /// The first segment of every token we sign (our algorithm and `kid`, encoded): a token
    /// whose header differs in any byte is not ours.
    encoded_header: String,
    encoding: EncodingKey,
    decoding: DecodingKey,
    /// HS256: the HMAC key, kept (jsonwebtoken rebuilds it on every verification).
    hmac: Option<aws_lc_rs::hmac::Key>,
    algorithm: Algorithm,
    leeway: i64,
    ttl: Duration,
    /// The public JWK set, as served.
    jwks: Option<serde_json::Value>,
}

impl AccessTokens {
    pub fn new(key: &SigningKey, ttl: Duration, leeway: Duration) -> Result<Self, KeyError> {
        let err = |e: jsonwebtoken::errors::Error| KeyError(e.to_string());
        let (algorithm, encoding, public) = match key {
            SigningKey::Hs256(secret) => {
                if secret.is_empty() {
                    return Err(KeyError("the secret is empty".into()));
                }
                (Algorithm::HS256, EncodingKey::from_secret(secret), None)
            }
            SigningKey::Rs256(pem) => {
                let encoding = EncodingKey::from_rsa_pem(pem).map_err(err)?;
                let jwk = Jwk::from_encoding_key(&encoding, Algorithm::RS256).map_err(err)?;
                (Algorithm::RS256, encoding, Some(jwk))
            }
            SigningKey::EdDsa(pem) => {
                let encoding = EncodingKey::from_ed_pem(pem).map_err(err)?;
                let jwk = Jwk::from_encoding_key(&encoding, Algorithm::EdDSA).map_err(err)?;
                (Algorithm::EdDSA, encoding, Some(jwk))
            }
        };
        let (kid, decoding, jwks) = match (key, public) {
            (SigningKey::Hs256(secret), _) => {
                // A label of the secret that does not reveal it.
                let kid = thumbprint(&[b"confab-hs256-kid", secret]);
                (kid, DecodingKey::from_secret(secret), None)
            }
            (_, Some(mut jwk)) => {
                let json =
                    serde_json::to_vec(&jwk.algorithm).map_err(|e| KeyError(e.to_string()))?;
                let kid = thumbprint(&[&json]);
                jwk.common.key_id = Some(kid.clone());
                let decoding = DecodingKey::from_jwk(&jwk).map_err(err)?;
                let set = serde_json::to_value(JwkSet { keys: vec![jwk] })
                    .map_err(|e| KeyError(e.to_string()))?;
                (kid, decoding, Some(set))
            }
            (_, None) => unreachable!("asymmetric keys always have a public JWK"),
        };
        let mut header = Header::new(algorithm);
        header.kid = Some(kid);
        let encoded_header = jsonwebtoken::encode(&header, &serde_json::json!({}), &encoding)
            .map_err(err)?
            .split('.')
            .next()
            .unwrap_or_default()
            .to_owned();
        let hmac = match key {
            SigningKey::Hs256(secret) => Some(aws_lc_rs::hmac::Key::new(
                aws_lc_rs::hmac::HMAC_SHA256,
                secret,
            )),
            _ => None,
        };
        let tokens = Self {
            header,
            encoded_header,
            encoding,
            decoding,
            hmac,
            algorithm,
            leeway: i64::try_from(leeway.as_secs()).unwrap_or(i64::MAX / 2),
            ttl,
            jwks,
        };
        // Prove the pair works before serving with it.
        let probe = tokens.issue(UserId::new(), RefreshFamilyId::new(), crate::domain::now());
        tokens
            .verify(&probe.0)
            .map_err(|InvalidToken| KeyError("a token signed with it does not verify".into()))?;
        Ok(tokens)
    }

    /// How long an access token lives.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The public keys, when tokens are signed with a key pair.
    pub fn jwks(&self) -> Option<&serde_json::Value> {
        self.jwks.as_ref()
    }

    /// A signed token for `user`, and its claims.
    pub fn issue(
        &self,
        user: UserId,
        family: RefreshFamilyId,
        at: crate::domain::Timestamp,
    ) -> (String, Claims) {
        let iat = at.timestamp();
        let claims = Claims {
            sub: user,
            sid: family,
            iat,
            ims: at.timestamp_millis(),
            exp: iat + i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX / 2),
            iss: ISSUER.into(),
            aud: AUDIENCE.into(),
        };
        let token = jsonwebtoken::encode(&self.header, &claims, &self.encoding)
            .expect("claims of plain fields always serialise and the key was checked");
        (token, claims)
    }

    /// The claims of a valid token: our algorithm and key id (the header must be exactly the
    /// one we sign with, so `alg: none` or any other algorithm is refused before anything
    /// else), the signature, issuer, audience and expiry (with leeway). Why a token is
    /// refused is not told.
    ///
    /// One parse of the claims and a kept HMAC key: about half the cost of
    /// `jsonwebtoken::decode`, which parses the header and the claims twice each and rebuilds
    /// the key (BENCHMARKS.md, issue 5).
    pub fn verify(&self, token: &str) -> Result<Claims, InvalidToken> {
        let mut parts = token.split('.');
        let (Some(header), Some(payload), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(InvalidToken);
        };
        if !crate::services::auth::crypto::same(header, &self.encoded_header) {
            return Err(InvalidToken);
        }
        let message = &token.as_bytes()[..header.len() + 1 + payload.len()];
        let signed = match &self.hmac {
            Some(key) => {
                let tag = URL_SAFE_NO_PAD
                    .decode(signature)
                    .map_err(|_| InvalidToken)?;
                aws_lc_rs::hmac::verify(key, message, &tag).is_ok()
            }
            None => {
                jsonwebtoken::crypto::verify(signature, message, &self.decoding, self.algorithm)
                    .unwrap_or(false)
            }
        };
        if !signed {
            return Err(InvalidToken);
        }
        let json = URL_SAFE_NO_PAD.decode(payload).map_err(|_| InvalidToken)?;
        let claims: Claims = serde_json::from_slice(&json).map_err(|_| InvalidToken)?;
        let now = chrono::Utc::now().timestamp();
        if claims.iss != ISSUER
            || claims.aud != AUDIENCE
            || claims.exp.saturating_add(self.leeway) < now
        {
            return Err(InvalidToken);
        }
        Ok(claims)
    }
}

fn thumbprint(parts: &[&[u8]]) -> String {
    let mut context = digest::Context::new(&digest::SHA256);
    for part in parts {
        context.update(part);
    }
    URL_SAFE_NO_PAD.encode(&context.finish().as_ref()[..12])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::now;

    fn ed25519_pem() -> Vec<u8> {
        let pair = aws_lc_rs::signature::Ed25519KeyPair::generate().unwrap();
        let der = pair.to_pkcs8v1().unwrap();
        let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
        format!("-----BEGIN PRIVATE KEY-----\n{b64}\n-----END PRIVATE KEY-----\n").into_bytes()
    }

    #[test]
    fn rs256_tokens_verify_and_publish_an_rsa_key() {
        use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der};
        let pair = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
        let der: Pkcs8V1Der = pair.as_der().unwrap();
        let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
        let pem = format!("-----BEGIN PRIVATE KEY-----\n{b64}\n-----END PRIVATE KEY-----\n");
        let tokens = AccessTokens::new(
            &SigningKey::Rs256(pem.into_bytes()),
            Duration::from_mins(15),
            Duration::from_secs(30),
        )
        .unwrap();
        let (token, claims) = tokens.issue(UserId::new(), RefreshFamilyId::new(), now());
        assert_eq!(tokens.verify(&token).unwrap(), claims);
        let key = &tokens.jwks().unwrap()["keys"][0];
        assert_eq!(key["kty"], "RSA");
        assert!(key["n"].is_string() && key["e"].is_string() && key.get("d").is_none());
    }

    #[test]
    fn eddsa_tokens_verify_with_the_published_key_only() {
        let tokens = AccessTokens::new(
            &SigningKey::EdDsa(ed25519_pem()),
            Duration::from_mins(15),
            Duration::from_secs(30),
        )
        .unwrap();
        let (token, claims) = tokens.issue(UserId::new(), RefreshFamilyId::new(), now());
        assert_eq!(tokens.verify(&token).unwrap(), claims);
        let jwks = tokens.jwks().unwrap();
        assert_eq!(jwks["keys"][0]["crv"], "Ed25519");
        assert_eq!(
            jwks["keys"][0]["kid"].as_str(),
            tokens.header.kid.as_deref()
        );
        let other = AccessTokens::new(
            &SigningKey::EdDsa(ed25519_pem()),
            Duration::from_mins(15),
            Duration::from_secs(30),
        )
        .unwrap();
        assert!(other.verify(&token).is_err());
    }

    fn hs(secret: &str) -> AccessTokens {
        AccessTokens::new(
            &SigningKey::Hs256(secret.as_bytes().to_vec()),
            Duration::from_mins(15),
            Duration::from_secs(30),
        )
        .unwrap()
    }

    #[test]
    fn a_token_verifies_with_its_key_only() {
        let tokens = hs("secret-one-secret-one-secret-one!!");
        let user = UserId::new();
        let (token, claims) = tokens.issue(user, RefreshFamilyId::new(), now());
        assert_eq!(tokens.verify(&token).unwrap(), claims);
        assert_eq!(claims.sub, user);
        assert_eq!(claims.exp - claims.iat, 900);
        assert!(
            hs("secret-two-secret-two-secret-two!!")
                .verify(&token)
                .is_err()
        );
    }

    #[test]
    fn expired_tokens_are_refused_beyond_the_leeway() {
        let tokens = hs("secret-one-secret-one-secret-one!!");
        let long_ago = now() - chrono::Duration::seconds(900 + 20);
        let (within, _) = tokens.issue(UserId::new(), RefreshFamilyId::new(), long_ago);
        assert!(
            tokens.verify(&within).is_ok(),
            "20 s late is within 30 s of leeway"
        );
        let older = now() - chrono::Duration::seconds(900 + 60);
        let (expired, _) = tokens.issue(UserId::new(), RefreshFamilyId::new(), older);
        assert!(tokens.verify(&expired).is_err());
    }

    #[test]
    fn alg_none_and_tampered_tokens_are_refused() {
        let tokens = hs("secret-one-secret-one-secret-one!!");
        let (token, _) = tokens.issue(UserId::new(), RefreshFamilyId::new(), now());
        let mut parts = token.split('.');
        let (_, payload) = (parts.next().unwrap(), parts.next().unwrap());
        let none = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
        assert!(tokens.verify(&format!("{none}.{payload}.")).is_err());
        let mut other = tokens.header.clone();
        other.kid = Some("another".into());
        let claims = tokens.verify(&token).unwrap();
        let foreign = jsonwebtoken::encode(&other, &claims, &tokens.encoding).unwrap();
        assert!(tokens.verify(&foreign).is_err(), "another kid is refused");
        let signed = |claims: &Claims| {
            jsonwebtoken::encode(&tokens.header, claims, &tokens.encoding).unwrap()
        };
        let other_issuer = Claims {
            iss: "someone-else".into(),
            ..claims.clone()
        };
        assert!(
            tokens.verify(&signed(&other_issuer)).is_err(),
            "another issuer"
        );
        let other_audience = Claims {
            aud: "another-service".into(),
            ..claims.clone()
        };
        assert!(
            tokens.verify(&signed(&other_audience)).is_err(),
            "another audience"
        );
        assert!(tokens.verify(&format!("{token}.extra")).is_err());
        let mut flipped = token.clone().into_bytes();
        let last = flipped.len() - 2;
        flipped[last] = if flipped[last] == b'A' { b'B' } else { b'A' };
        assert!(
            tokens
                .verify(std::str::from_utf8(&flipped).unwrap())
                .is_err(),
            "a bad signature"
        );
        assert!(tokens.verify("not.a.token").is_err());
    }
}

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
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
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
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
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
        let mut validation = Validation::new(algorithm);
        validation.algorithms = vec![algorithm];
        validation.leeway = leeway.as_secs();
        validation.set_issuer(&[ISSUER]);
        validation.set_audience(&[AUDIENCE]);
        validation.set_required_spec_claims(&["exp", "sub", "iss", "aud"]);
        let tokens = Self {
            header,
            encoding,
            decoding,
            validation,
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
            exp: iat + i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX / 2),
            iss: ISSUER.into(),
            aud: AUDIENCE.into(),
        };
        let token = jsonwebtoken::encode(&self.header, &claims, &self.encoding)
            .expect("claims of plain fields always serialise and the key was checked");
        (token, claims)
    }

    /// The claims of a valid token: our algorithm, our key id, signature, issuer, audience
    /// and expiry (with leeway) all checked. Why a token is refused is not told.
    pub fn verify(&self, token: &str) -> Result<Claims, InvalidToken> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|_| InvalidToken)?;
        if data.header.kid != self.header.kid {
            return Err(InvalidToken);
        }
        Ok(data.claims)
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
        assert!(tokens.verify("not.a.token").is_err());
    }
}

//! A sandbox's own certificate authority: made once per sandbox (its key stays in the sandbox's
//! host directory, 0600, and in the network process's memory), trusted by that sandbox's guest
//! only, and issuing a short-lived leaf certificate for each host the interceptor serves.
//!
//! Why per sandbox: its key never leaves the host, and a CA trusted by one sandbox vouches for
//! nothing in another. Why not name constraints: a running sandbox's secret hosts can change
//! (`smolvm secret set`), and the guest would have to trust a new CA each time.

use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::{Duration, OffsetDateTime};

/// The CA's parameters: its name comes from `label` (the sandbox), so that a loaded CA can
/// issue under exactly the name its certificate carries.
fn ca_params(label: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("smolvm egress CA ({label})"));
    dn.push(DnType::OrganizationName, "smolvm");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    p
}

/// The PEM files of a new CA for the sandbox `label`: (certificate, private key).
pub fn generate(label: &str) -> Result<(String, String), String> {
    let key = KeyPair::generate().map_err(|e| e.to_string())?;
    let mut p = ca_params(label);
    let now = OffsetDateTime::now_utc();
    // Guests' clocks may lag the host's by a little.
    p.not_before = now - Duration::days(1);
    p.not_after = now + Duration::days(3650);
    let cert = p.self_signed(&key).map_err(|e| e.to_string())?;
    Ok((cert.pem(), key.serialize_pem()))
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Its key is never printed.
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

/// A loaded CA that signs leaf certificates.
pub struct Ca {
    issuer: rcgen::Issuer<'static, KeyPair>,
    cert_der: CertificateDer<'static>,
}

impl Ca {
    /// The CA of sandbox `label` from its two PEM files (made by [`generate`]).
    pub fn from_pem(label: &str, cert_pem: &str, key_pem: &str) -> Result<Ca, String> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| format!("its key: {e}"))?;
        let cert_der: CertificateDer<'static> = rustls::pki_types::pem::PemObject::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| format!("its certificate: {e}"))?;
        Ok(Ca { issuer: rcgen::Issuer::new(ca_params(label), key), cert_der })
    }

    /// A certificate for `name` (valid for 30 days from yesterday) and its key.
    pub fn leaf(&self, name: &str) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
        let key = KeyPair::generate().map_err(|e| e.to_string())?;
        let mut p = CertificateParams::new(vec![name.to_string()]).map_err(|e| e.to_string())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        p.distinguished_name = dn;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        // Strict verifiers (OpenSSL's X509_STRICT, on by default in Python 3.13) want the
        // issuer's key named in the leaf.
        p.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        p.not_before = now - Duration::days(1);
        p.not_after = now + Duration::days(30);
        let cert = p.signed_by(&key, &self.issuer).map_err(|e| e.to_string())?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok((vec![cert.der().clone(), self.cert_der.clone()], key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::ServerCertVerifier;

    #[test]
    fn a_leaf_verifies_against_its_ca_and_not_another() {
        let (cert, key) = generate("t").unwrap();
        let ca = Ca::from_pem("t", &cert, &key).unwrap();
        let (chain, _) = ca.leaf("api.example.test").unwrap();
        let verify = |root_pem: &str| {
            let mut roots = rustls::RootCertStore::empty();
            let root: CertificateDer<'static> =
                rustls::pki_types::pem::PemObject::from_pem_slice(root_pem.as_bytes()).unwrap();
            roots.add(root).unwrap();
            let v = rustls::client::WebPkiServerVerifier::builder_with_provider(
                std::sync::Arc::new(roots),
                std::sync::Arc::new(rustls::crypto::ring::default_provider()),
            )
            .build()
            .unwrap();
            let name = rustls::pki_types::ServerName::try_from("api.example.test").unwrap();
            v.verify_server_cert(&chain[0], &chain[1..], &name, &[], rustls::pki_types::UnixTime::now()).is_ok()
        };
        assert!(verify(&cert));
        // OpenSSL in its strict mode (Python 3.13's default) accepts the chain too.
        let dir = std::env::temp_dir().join(format!("smolvm-ca-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("ca.pem"), &cert).unwrap();
        let leaf = &chain[0];
        let leaf_pem = format!(
            "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, leaf.as_ref())
        );
        std::fs::write(dir.join("leaf.pem"), leaf_pem).unwrap();
        if let Ok(out) = std::process::Command::new("openssl")
            .args(["verify", "-x509_strict", "-purpose", "sslserver", "-CAfile"])
            .arg(dir.join("ca.pem"))
            .arg(dir.join("leaf.pem"))
            .output()
        {
            assert!(out.status.success(), "openssl -x509_strict: {}", String::from_utf8_lossy(&out.stdout));
        }
        let _ = std::fs::remove_dir_all(&dir);
        let (other, _) = generate("other").unwrap();
        assert!(!verify(&other), "a leaf verified against another sandbox's CA");
        assert!(Ca::from_pem("t", &cert, "not a key").is_err());
    }
}

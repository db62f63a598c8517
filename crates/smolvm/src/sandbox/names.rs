//! Sandbox names: chosen by the user or generated, always safe as a path, a hostname and a
//! QEMU process name.

use std::io::Read;

/// Why a name is refused.
#[derive(Debug, thiserror::Error)]
#[error("invalid sandbox name {name:?}: use 1-63 lowercase letters, digits and '-', starting with a letter or digit")]
pub struct NameError {
    pub name: String,
}

/// Checks a user-chosen name.
pub fn validate(name: &str) -> Result<(), NameError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(NameError { name: name.to_string() })
    }
}

/// `sbx-` and six random hex digits.
pub fn generate() -> String {
    let mut bytes = [0u8; 3];
    let random = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if random.is_err() {
        // Unique enough for a name (the database refuses duplicates anyway).
        let t =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        bytes.copy_from_slice(&(t ^ std::process::id()).to_le_bytes()[..3]);
    }
    format!("sbx-{}", hex::encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "sbx-1f2e3d", "my-box-2"] {
            validate(ok).unwrap();
        }
        for bad in ["", "-a", "A", "a_b", "a/b", "a.b", &"x".repeat(64)] {
            assert!(validate(bad).is_err(), "{bad}");
        }
        let g = generate();
        validate(&g).unwrap();
        assert_eq!(g.len(), 10);
    }
}

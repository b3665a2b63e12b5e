//! Identifiers, names and paths: generation and the REST contract's validation rules.

/// `n` random bytes as lowercase hex.
pub fn random_hex(n: usize) -> Result<String, String> {
    let mut bytes = vec![0u8; n];
    getrandom::fill(&mut bytes).map_err(|e| e.to_string())?;
    Ok(hex(&bytes))
}

pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        out.push(char::from(DIGITS[usize::from(byte >> 4)]));
        out.push(char::from(DIGITS[usize::from(byte & 0xf)]));
    }
    out
}

/// A sandbox or host id: `[a-z0-9][a-z0-9-]{0,62}`.
pub fn valid_id(id: &str) -> bool {
    let bytes = id.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && (bytes[0].is_ascii_lowercase() || bytes[0].is_ascii_digit())
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
}

/// A snapshot or template name: `[a-z0-9][a-z0-9._-]{0,62}`.
pub fn valid_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && (bytes[0].is_ascii_lowercase() || bytes[0].is_ascii_digit())
        && bytes.iter().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.' | b'_')
        })
}

/// Why a path in a sandbox is refused, if it is.
pub fn check_path(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err("the path is empty".into());
    }
    if path.len() > 4096 {
        return Err(format!(
            "the path is {} bytes long; at most 4096",
            path.len()
        ));
    }
    if path.contains('\0') {
        return Err("the path contains a NUL byte".into());
    }
    if path.split('/').any(|part| part == "..") {
        return Err(format!("the path {path:?} has a `..` component"));
    }
    Ok(())
}

/// A request id the client sent, if it is sane: 1 to 64 of `[A-Za-z0-9._-]`.
pub fn sane_request_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules() {
        assert!(valid_id("sbx-0123"));
        assert!(!valid_id("-a"));
        assert!(!valid_id("A"));
        assert!(!valid_id(&"a".repeat(64)));
        assert!(valid_name("my.snap_1"));
        assert!(check_path("a/../b").is_err());
        assert!(check_path("/home/user/x").is_ok());
        assert!(sane_request_id("abc-1.2_3"));
        assert!(!sane_request_id("a b"));
        assert_eq!(hex(&[0, 255, 16]), "00ff10");
    }
}

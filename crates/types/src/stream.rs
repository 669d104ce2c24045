//! The Contree rule for bytes in JSON (`StreamRepr`, stream events), shared by server and
//! clients.

use base64::Engine as _;
use serde_json::Value;

/// `ascii` iff every byte is printable ASCII (32..=126) or `\t`, `\n`, `\r`; otherwise base64.
pub fn encode_stream(bytes: &[u8]) -> (String, &'static str) {
    if bytes.iter().all(|&b| (32..=126).contains(&b) || matches!(b, b'\t' | b'\n' | b'\r')) {
        (String::from_utf8_lossy(bytes).into_owned(), "ascii")
    } else {
        (base64::engine::general_purpose::STANDARD.encode(bytes), "base64")
    }
}

/// The bytes of an event's `{value, encoding}` (the inverse of [`encode_stream`]).
pub fn decode_stream(data: &Value) -> Vec<u8> {
    let value = data.get("value").and_then(Value::as_str).unwrap_or("");
    match data.get("encoding").and_then(Value::as_str) {
        Some("base64") => base64::engine::general_purpose::STANDARD.decode(value).unwrap_or_default(),
        _ => value.as_bytes().to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_encoding_rule() {
        assert_eq!(encode_stream(b"hi\tthere\r\n"), ("hi\tthere\r\n".into(), "ascii"));
        assert_eq!(encode_stream("é".as_bytes()), ("w6k=".into(), "base64"));
        assert_eq!(encode_stream(b"\x00"), ("AA==".into(), "base64"));
        assert_eq!(encode_stream(b""), ("".into(), "ascii"));
        let bytes = [0u8, 200, 10];
        let (value, encoding) = encode_stream(&bytes);
        assert_eq!(decode_stream(&serde_json::json!({"value": value, "encoding": encoding})), bytes);
    }
}

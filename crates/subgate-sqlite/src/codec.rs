//! How the JSON of profile rows and transactions is stored: LZ4-compressed against a fixed
//! dictionary, behind a one-byte format tag.
//!
//! A seeded profile's row went from 1.6 KB of JSON to about 410 bytes, so the table takes a
//! quarter of the pages: fewer reads miss the page cache, and the kernel keeps more of the table
//! when it reclaims memory (ADR 0010). The dictionary matters because each value is compressed
//! alone: a row is too short to repeat much of itself, but it repeats the field names and the
//! usual values of every other row, and the dictionary holds those. zstd made values 15%
//! smaller but took 2.3 µs to decompress one where LZ4 takes 0.3 µs, on a read's hot path.
//!
//! Columns written before this format hold their JSON as TEXT and are read as they are; each
//! is compressed when a write next changes it (an update leaves an unchanged column as it is).

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ValueRef};
use serde::de::DeserializeOwned;
use serde::Serialize;
use subgate_core::json::from_stored;
use subgate_core::store::StoreError;

/// The tag of a value compressed with [`DICTIONARY_V1`]: the tag, the JSON's length as a
/// little-endian u32, then the LZ4 block.
const LZ4_V1: u8 = 1;

/// Sample rows in the stored JSON's shape (field names, their order, common values). Frozen:
/// every value written with it needs these exact bytes to be read, so a better dictionary is a
/// new file under a new tag, beside this one. A test pins its hash.
const DICTIONARY_V1: &[u8] = include_bytes!("stored-json-v1.dict");

/// No stored document comes near this; a larger length means a damaged value, which must not
/// make the reader allocate it.
const MAX_DECODED: usize = 256 << 20;

fn internal(e: impl std::fmt::Display) -> StoreError {
    StoreError::Internal(format!("stored JSON: {e}"))
}

/// `value` as its column holds it.
pub fn encode(value: &impl Serialize) -> Result<Vec<u8>, StoreError> {
    let json = sonic_rs::to_vec(value).map_err(internal)?;
    let length = u32::try_from(json.len())
        .ok()
        .filter(|&n| n as usize <= MAX_DECODED)
        .ok_or_else(|| internal(format_args!("a document of {} bytes", json.len())))?;
    let mut stored = vec![0; 5 + lz4_flex::block::get_maximum_output_size(json.len())];
    stored[0] = LZ4_V1;
    stored[1..5].copy_from_slice(&length.to_le_bytes());
    let packed = lz4_flex::block::compress_into_with_dict(&json, &mut stored[5..], DICTIONARY_V1)
        .map_err(internal)?;
    stored.truncate(5 + packed);
    Ok(stored)
}

/// A column holding JSON, as read: compressed or, from rows written before the format, plain.
#[derive(Debug)]
pub enum StoredJson {
    Text(Vec<u8>),
    Packed(Vec<u8>),
}

impl FromSql for StoredJson {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        match value {
            ValueRef::Text(json) => Ok(Self::Text(json.to_vec())),
            ValueRef::Blob(packed) => Ok(Self::Packed(packed.to_vec())),
            _ => Err(FromSqlError::InvalidType),
        }
    }
}

impl StoredJson {
    /// The value, or an error naming `what` if it cannot be read.
    pub fn decode<T: DeserializeOwned>(&self, what: &str) -> Result<T, StoreError> {
        let corrupt =
            |e: &dyn std::fmt::Display| StoreError::Internal(format!("unreadable {what}: {e}"));
        match self {
            Self::Text(json) => from_stored(json).map_err(|e| corrupt(&e)),
            Self::Packed(packed) => {
                let (length, block) = match packed.as_slice() {
                    [LZ4_V1, a, b, c, d, block @ ..] => {
                        (u32::from_le_bytes([*a, *b, *c, *d]) as usize, block)
                    }
                    _ => return Err(corrupt(&"an unknown format")),
                };
                if length > MAX_DECODED {
                    return Err(corrupt(&format_args!("a length of {length} bytes")));
                }
                let json = lz4_flex::block::decompress_with_dict(block, length, DICTIONARY_V1)
                    .map_err(|e| corrupt(&e))?;
                if json.len() != length {
                    return Err(corrupt(&format_args!(
                        "{} bytes where {length} were written",
                        json.len()
                    )));
                }
                from_stored(&json).map_err(|e| corrupt(&e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_value_reads_back_as_written_and_smaller() {
        let transactions = json!([{
            "id": "019a2b3c-4d5e-7f60-8123-456789abcdef",
            "seq": 1,
            "purchase_type": "subscription",
            "store": "app_store",
            "environment": "Production",
            "store_product_id": "com.words.pro.annual",
            "store_transaction_id": "1000000987654321",
            "store_original_transaction_id": "1000000987654321",
            "is_family_shared": false,
            "price": {"country": "FR", "currency": "EUR", "value_micros": 59990000,
                      "usd_micros": 64790000},
            "purchased_at": "2027-03-04T05:06:07.123456789Z",
            "expires_at": "2028-03-04T05:06:07.123456789Z",
            "renew_status": true,
            "created_at": "2027-03-04T05:06:08.000001Z",
            "updated_at": "2027-03-04T05:06:08.000001Z"
        }]);
        let stored = encode(&transactions).unwrap();
        assert_eq!(stored[0], LZ4_V1);
        let json = transactions.to_string().len();
        assert!(
            stored.len() * 10 < json * 4,
            "{} bytes of {json}",
            stored.len()
        );
        let read: serde_json::Value = StoredJson::Packed(stored).decode("doc").unwrap();
        assert_eq!(read, transactions);
    }

    /// Written by sonic-rs and read by serde_json: numbers at the edges of `f64` and strings
    /// that need escaping must come back as they went in.
    #[test]
    fn a_profile_document_with_odd_numbers_and_text_reads_back_as_written() {
        use subgate_core::model::{AttributeValue, ProfileDoc};
        let numbers = [
            0.1,
            -0.0,
            42.0,
            1e300,
            -1.7976931348623157e308,
            5e-324,
            9_007_199_254_740_993.0,
            1.0 / 3.0,
        ];
        let texts = [
            "quote \" slash \\ / tab \t nl \n",
            "\u{1} \u{1f} \u{7f}",
            "é 😀 \u{2028} \u{2029}",
            "",
        ];
        let mut doc = ProfileDoc::default();
        for (i, n) in numbers.iter().enumerate() {
            doc.attributes
                .insert(format!("n{i}"), AttributeValue::Number(*n));
        }
        for (i, text) in texts.iter().enumerate() {
            doc.attributes
                .insert(format!("s{i} \"k\""), AttributeValue::Text((*text).into()));
        }
        let read: ProfileDoc = StoredJson::Packed(encode(&doc).unwrap())
            .decode("profile")
            .unwrap();
        assert_eq!(read, doc);
        for (i, n) in numbers.iter().enumerate() {
            match &read.attributes[&format!("n{i}")] {
                AttributeValue::Number(m) => assert_eq!(m.to_bits(), n.to_bits(), "{n}"),
                other => panic!("{n} read back as {other:?}"),
            }
        }
    }

    /// LZ4 matches reach back 64 KB at most; a long transaction list must still read back.
    #[test]
    fn a_value_far_longer_than_the_dictionary_reads_back() {
        let long: Vec<serde_json::Value> = (0..5_000)
            .map(|i| json!({"store_transaction_id": format!("t-{i}"), "seq": i}))
            .collect();
        let stored = encode(&long).unwrap();
        let read: Vec<serde_json::Value> = StoredJson::Packed(stored).decode("doc").unwrap();
        assert_eq!(read, long);
    }

    #[test]
    fn json_written_before_the_format_still_reads() {
        let read: serde_json::Value = StoredJson::Text(br#"{"a":[1,2]}"#.to_vec())
            .decode("doc")
            .unwrap();
        assert_eq!(read, json!({"a": [1, 2]}));
    }

    #[test]
    fn a_damaged_value_is_an_error_naming_the_column() {
        let mut stored = encode(&json!({"plan": "gold"})).unwrap();
        let cases = [
            StoredJson::Packed(vec![]),
            StoredJson::Packed(vec![9, 1, 2, 3]),
            StoredJson::Packed({
                let last = stored.len() - 1;
                stored[last] ^= 0xff;
                stored.clone()
            }),
            StoredJson::Packed(stored[..stored.len() / 2].to_vec()),
            StoredJson::Text(b"{".to_vec()),
        ];
        for case in cases {
            match case.decode::<serde_json::Value>("profile") {
                Err(StoreError::Internal(message)) => {
                    assert!(message.starts_with("unreadable profile: "), "{message}")
                }
                other => panic!("{case:?} read as {other:?}"),
            }
        }
    }

    /// Values on disk need these exact bytes: a change must come as a new dictionary and tag.
    #[test]
    fn the_dictionary_stays_what_stored_values_were_written_with() {
        let hash = subgate_core::fnv::fnv1a(DICTIONARY_V1);
        assert_eq!(
            (DICTIONARY_V1.len(), hash),
            (3556, 16_908_439_530_889_307_905)
        );
    }
}

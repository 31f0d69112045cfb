//! Canonical JSON for phase 3 (`canonical-json = true`): the same message written by
//! two clients (Python puts spaces after `:` and `,`, Go a trailing newline, key order
//! varies) must be one fingerprint, and two different messages must never be.
//!
//! So the form is exact, not "parse into floats and print": object keys sorted, no
//! insignificant white space, strings re-escaped one way, and every number kept as
//! the very text the client wrote (`12345678901234567890123` stays itself; `1.0` and
//! `1` stay two numbers, which at worst misses a merge, never makes a wrong one).
//! Anything that cannot be canonicalised without losing information (not JSON,
//! duplicate keys, nesting deeper than [`MAX_DEPTH`]) gives `None`: the caller then
//! hashes the raw bytes.

/// serde_json's own recursion limit; deeper input is hashed raw, never recursed into.
pub(crate) const MAX_DEPTH: usize = 128;

/// The canonical form of `body`, or `None` if it is not JSON that can be canonicalised
/// exactly.
pub fn canonical(body: &[u8]) -> Option<Vec<u8>> {
    let mut parser = Parser { input: body, at: 0 };
    let mut out = Vec::with_capacity(body.len());
    parser.value(&mut out, 0)?;
    parser.skip_space();
    (parser.at == body.len()).then_some(out)
}

struct Parser<'a> {
    input: &'a [u8],
    at: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.input.get(self.at).copied()
    }

    fn skip_space(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.at += 1;
        }
    }

    fn eat(&mut self, byte: u8) -> Option<()> {
        (self.peek()? == byte).then(|| self.at += 1)
    }

    fn literal(&mut self, word: &[u8], out: &mut Vec<u8>) -> Option<()> {
        let end = self.at.checked_add(word.len())?;
        (self.input.get(self.at..end)? == word).then(|| {
            self.at = end;
            out.extend_from_slice(word);
        })
    }

    fn value(&mut self, out: &mut Vec<u8>, depth: usize) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        self.skip_space();
        match self.peek()? {
            b'{' => self.object(out, depth),
            b'[' => self.array(out, depth),
            b'"' => {
                let text = self.string()?;
                write_string(&text, out);
                Some(())
            }
            b't' => self.literal(b"true", out),
            b'f' => self.literal(b"false", out),
            b'n' => self.literal(b"null", out),
            b'-' | b'0'..=b'9' => self.number(out),
            _ => None,
        }
    }

    fn object(&mut self, out: &mut Vec<u8>, depth: usize) -> Option<()> {
        self.eat(b'{')?;
        let mut members: Vec<(String, Vec<u8>)> = Vec::new();
        self.skip_space();
        if self.eat(b'}').is_none() {
            loop {
                self.skip_space();
                let key = self.string()?;
                self.skip_space();
                self.eat(b':')?;
                let mut value = Vec::new();
                self.value(&mut value, depth + 1)?;
                members.push((key, value));
                self.skip_space();
                if self.eat(b',').is_some() {
                    continue;
                }
                self.eat(b'}')?;
                break;
            }
        }
        members.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        // A duplicate key means the client's JSON has two readings: keep its raw bytes.
        if members.windows(2).any(|w| w[0].0 == w[1].0) {
            return None;
        }
        out.push(b'{');
        for (i, (key, value)) in members.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            write_string(key, out);
            out.push(b':');
            out.extend_from_slice(value);
        }
        out.push(b'}');
        Some(())
    }

    fn array(&mut self, out: &mut Vec<u8>, depth: usize) -> Option<()> {
        self.eat(b'[')?;
        out.push(b'[');
        self.skip_space();
        if self.eat(b']').is_none() {
            loop {
                self.value(out, depth + 1)?;
                self.skip_space();
                if self.eat(b',').is_some() {
                    out.push(b',');
                    continue;
                }
                self.eat(b']')?;
                break;
            }
        }
        out.push(b']');
        Some(())
    }

    /// RFC 8259's number grammar, copied through as written.
    fn number(&mut self, out: &mut Vec<u8>) -> Option<()> {
        let start = self.at;
        let _ = self.eat(b'-');
        match self.peek()? {
            b'0' => self.at += 1,
            b'1'..=b'9' => self.digits(),
            _ => return None,
        }
        if self.eat(b'.').is_some() {
            self.one_or_more_digits()?;
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.at += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.at += 1;
            }
            self.one_or_more_digits()?;
        }
        out.extend_from_slice(&self.input[start..self.at]);
        Some(())
    }

    fn digits(&mut self) {
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.at += 1;
        }
    }

    fn one_or_more_digits(&mut self) -> Option<()> {
        let start = self.at;
        self.digits();
        (self.at > start).then_some(())
    }

    /// A string's text with its escapes decoded; invalid UTF-8, raw control characters,
    /// bad escapes and lone surrogates are not JSON.
    fn string(&mut self) -> Option<String> {
        self.eat(b'"')?;
        let mut text = Vec::new();
        loop {
            let byte = self.peek()?;
            self.at += 1;
            match byte {
                b'"' => return String::from_utf8(text).ok(),
                b'\\' => {
                    let escaped = self.peek()?;
                    self.at += 1;
                    let decoded = match escaped {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => self.unicode_escape()?,
                        _ => return None,
                    };
                    let mut buf = [0u8; 4];
                    text.extend_from_slice(decoded.encode_utf8(&mut buf).as_bytes());
                }
                0x00..=0x1f => return None,
                other => text.push(other),
            }
        }
    }

    /// The code point of `\uXXXX`, or of a `\uD8xx\uDCxx` surrogate pair.
    fn unicode_escape(&mut self) -> Option<char> {
        let high = self.hex4()?;
        if !(0xD800..0xDC00).contains(&high) {
            return char::from_u32(high);
        }
        self.eat(b'\\')?;
        self.eat(b'u')?;
        let low = self.hex4()?;
        if !(0xDC00..0xE000).contains(&low) {
            return None;
        }
        char::from_u32(0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00))
    }

    fn hex4(&mut self) -> Option<u32> {
        let end = self.at.checked_add(4)?;
        let digits = std::str::from_utf8(self.input.get(self.at..end)?).ok()?;
        // from_str_radix takes a leading sign; JSON does not.
        if !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        self.at = end;
        u32::from_str_radix(digits, 16).ok()
    }
}

/// One way of writing a string: `"` and `\` escaped, control characters as serde_json
/// writes them, everything else as UTF-8.
fn write_string(text: &str, out: &mut Vec<u8>) {
    // Writing a &str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, text);
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    fn canon(text: &str) -> Option<String> {
        canonical(text.as_bytes()).map(|c| String::from_utf8(c).unwrap())
    }

    #[test]
    fn sorts_keys_and_drops_space() {
        assert_eq!(
            canon(" {\"b\": [1, 2 ,{\"z\":null, \"a\":true}], \"a\" : \"x\"}\n").as_deref(),
            Some(r#"{"a":"x","b":[1,2,{"a":true,"z":null}]}"#)
        );
    }

    #[test]
    fn numbers_stay_exactly_as_written() {
        let a = canon(r#"{"n":12345678901234567890123}"#).unwrap();
        let b = canon(r#"{"n":12345678901234567890124}"#).unwrap();
        assert_ne!(a, b);
        assert_eq!(a, r#"{"n":12345678901234567890123}"#);
        assert_ne!(canon("1.0"), canon("1"));
        assert_ne!(canon("1e400"), canon("2e400"));
        assert_eq!(canon("-0.5E+3").as_deref(), Some("-0.5E+3"));
    }

    #[test]
    fn escapes_are_decoded_then_written_one_way() {
        assert_eq!(canon(r#""\u0041\/\u00e9""#), canon("\"A/\u{e9}\""));
        assert_eq!(canon(r#""\ud83d\ude00""#), canon("\"\u{1F600}\""));
        assert_eq!(canon(r#"{"\u0061":1}"#), canon(r#"{"a":1}"#));
    }

    #[test]
    fn what_cannot_be_canonicalised_exactly_is_refused() {
        for bad in [
            "",
            "{",
            "{} x",
            r#"{"a":1,"a":2}"#,
            r#"{"a":1,"\u0061":2}"#,
            "[1,]",
            "01",
            "1.",
            "-",
            "+1",
            "1e",
            r#""\ud800""#,
            r#""\x""#,
            "\"\u{1}\"",
            "\u{feff}{}",
            "tru",
            "NaN",
            r#""\u+123""#,
        ] {
            assert_eq!(canon(bad), None, "{bad:?}");
        }
        let deep = "[".repeat(MAX_DEPTH + 2) + &"]".repeat(MAX_DEPTH + 2);
        assert_eq!(canon(&deep), None);
        let ok = "[".repeat(MAX_DEPTH) + &"]".repeat(MAX_DEPTH);
        assert!(canon(&ok).is_some());
        assert_eq!(canonical(&[b'"', 0xff, b'"']), None);
    }

    /// Arbitrary JSON values, hard strings and integers past i64 included; shared with
    /// the fingerprint's property tests.
    pub(crate) fn json_value() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<u64>().prop_map(serde_json::Value::from),
            "[a-z😀 \"\\\\\u{1}]{0,8}".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
                prop::collection::btree_map("[a-z]{1,4}", inner, 0..4)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn the_same_value_written_two_ways_is_one_form(v in json_value()) {
            let compact = serde_json::to_vec(&v).unwrap();
            let pretty = serde_json::to_vec_pretty(&v).unwrap();
            prop_assert_eq!(canonical(&compact), canonical(&pretty));
            prop_assert!(canonical(&compact).is_some());
        }

        #[test]
        fn the_form_is_a_fixed_point_and_still_the_same_value(v in json_value()) {
            let once = canonical(&serde_json::to_vec_pretty(&v).unwrap()).unwrap();
            prop_assert_eq!(canonical(&once), Some(once.clone()));
            let back: serde_json::Value = serde_json::from_slice(&once).unwrap();
            prop_assert_eq!(back, v);
        }

        #[test]
        fn different_values_never_share_a_form(a in json_value(), b in json_value()) {
            prop_assume!(a != b);
            prop_assert_ne!(
                canonical(&serde_json::to_vec(&a).unwrap()),
                canonical(&serde_json::to_vec(&b).unwrap())
            );
        }

        #[test]
        fn big_integers_are_never_merged(a in "[1-9][0-9]{18,40}", b in "[1-9][0-9]{18,40}") {
            prop_assume!(a != b);
            prop_assert_ne!(canonical(a.as_bytes()), canonical(b.as_bytes()));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
            let _ = canonical(&bytes);
        }
    }
}

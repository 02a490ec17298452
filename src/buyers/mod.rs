//! The buyer wire protocol of CONTRACT §3, sans-I/O: lead -> request bytes, reply bytes ->
//! bid or acceptance. Odd replies (string prices, HTML errors, empty bodies) end here as
//! "no bid" or "refused" with a reason, never as an error that escapes.

use serde::Serialize;
use serde_json::Value;
use serde_json::value::RawValue;

use crate::domain::{FieldMap, Price};

/// A price on the wire: a JSON number with two decimals (`45.00`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WirePrice(pub Price);

impl Serialize for WirePrice {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let raw = RawValue::from_string(self.0.to_string()).map_err(serde::ser::Error::custom)?;
        raw.serialize(serializer)
    }
}

/// Where in a buyer's reply the exchange finds the bid, token and acceptance. The defaults
/// are the exchange's own protocol; buyers with their own API set paths like
/// `data.offer.price`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyMapping {
    pub bid_path: String,
    pub token_path: String,
    pub accept_path: String,
    /// The value at `accept_path` meaning "bought"; `None` means boolean `true`.
    pub accept_value: Option<String>,
}

impl Default for ReplyMapping {
    fn default() -> Self {
        ReplyMapping {
            bid_path: "bid".to_owned(),
            token_path: "token".to_owned(),
            accept_path: "accepted".to_owned(),
            accept_value: None,
        }
    }
}

#[derive(Serialize)]
struct PingBody<'a, L: Serialize + ?Sized> {
    ping_id: &'a str,
    campaign: &'a str,
    category: &'a str,
    lead: &'a L,
}

#[derive(Serialize)]
struct PostBody<'a> {
    ping_id: &'a str,
    lead_id: &'a str,
    price: WirePrice,
    token: Option<&'a Value>,
    campaign: &'a str,
    category: &'a str,
    lead: &'a FieldMap,
}

pub fn ping_body<L: Serialize + ?Sized>(
    ping_id: &str,
    campaign: &str,
    category: &str,
    lead_without_personal: &L,
) -> Vec<u8> {
    serde_json::to_vec(&PingBody {
        ping_id,
        campaign,
        category,
        lead: lead_without_personal,
    })
    .expect("a map of JSON values always serialises")
}

pub struct PostRequest<'a> {
    pub ping_id: &'a str,
    pub lead_id: &'a str,
    pub price: Price,
    pub token: Option<&'a Value>,
    pub campaign: &'a str,
    pub category: &'a str,
    pub lead: &'a FieldMap,
}

pub fn post_body(req: &PostRequest<'_>) -> Vec<u8> {
    serde_json::to_vec(&PostBody {
        ping_id: req.ping_id,
        lead_id: req.lead_id,
        price: WirePrice(req.price),
        token: req.token,
        campaign: req.campaign,
        category: req.category,
        lead: req.lead,
    })
    .expect("a map of JSON values always serialises")
}

/// Why a ping brought no bid. The words are metric label values, so the set is fixed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoBid {
    /// Valid answer without a bid, or a bid of 0.
    Declined,
    HttpStatus,
    BadBody,
    Timeout,
    /// Could not connect or the connection broke.
    Transport,
    /// The buyer already had its maximum of requests in flight.
    Overloaded,
}

impl NoBid {
    pub fn as_str(self) -> &'static str {
        match self {
            NoBid::Declined => "no_bid",
            NoBid::HttpStatus => "http_error",
            NoBid::BadBody => "bad_body",
            NoBid::Timeout => "timeout",
            NoBid::Transport => "transport_error",
            NoBid::Overloaded => "overloaded",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PingReply {
    /// `token` is echoed in the post exactly as the buyer sent it.
    Bid {
        price: Price,
        token: Option<Value>,
    },
    NoBid(NoBid),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Declined,
    HttpStatus,
    BadBody,
    Timeout,
    Transport,
    Overloaded,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Declined => "rejected",
            Refusal::HttpStatus => "http_error",
            Refusal::BadBody => "bad_body",
            Refusal::Timeout => "timeout",
            Refusal::Transport => "transport_error",
            Refusal::Overloaded => "overloaded",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PostReply {
    Accepted,
    /// Refused, with the buyer's own reason when it gave one (kept for the auction log).
    Refused(Refusal, Option<String>),
}

/// A buyer's reply, read only along the paths the exchange looks at: its top-level object is
/// read once as keys and unparsed values, each object further along a path likewise, and only
/// the value at the end is parsed. Replies carry more than a bid and a token, and a tree of
/// all of it (a map, its keys, each value) was most of what reading one cost.
struct Reply<'a> {
    body: &'a [u8],
    top: Top<'a>,
}

enum Top<'a> {
    Object(Entries<'a>),
    Other(&'a RawValue),
}

/// Why a path could not be read: a value on it that is valid JSON but not a value serde_json
/// can hold (a number out of range), which makes the reply unusable as a whole.
struct Unreadable;

impl<'a> Reply<'a> {
    /// `None` when the body is not one JSON value.
    fn parse(body: &'a [u8]) -> Option<Reply<'a>> {
        let top = if body.trim_ascii_start().first() == Some(&b'{') {
            Top::Object(serde_json::from_slice(body).ok()?)
        } else {
            Top::Other(serde_json::from_slice(body).ok()?)
        };
        Some(Reply { body, top })
    }

    /// Follows a dotted path (`data.offer.price`; numeric parts index arrays).
    fn get(&self, path: &str) -> Result<Option<Value>, Unreadable> {
        let mut parts = path.split('.').filter(|p| !p.is_empty());
        let Some(first) = parts.next() else {
            return serde_json::from_slice(self.body)
                .map(Some)
                .map_err(|_| Unreadable);
        };
        let mut at = match &self.top {
            Top::Object(entries) => entries.get(first),
            Top::Other(value) => step(value, first)?,
        };
        for part in parts {
            at = match at {
                Some(value) => step(value, part)?,
                None => return Ok(None),
            };
        }
        at.map(|value| serde_json::from_str(value.get()).map_err(|_| Unreadable))
            .transpose()
    }
}

/// One part of a path into `value`: a key of an object or an index into an array.
fn step<'a>(value: &'a RawValue, part: &str) -> Result<Option<&'a RawValue>, Unreadable> {
    let text = value.get().trim_start();
    Ok(match text.as_bytes().first() {
        Some(b'{') => serde_json::from_str::<Entries<'a>>(text)
            .map_err(|_| Unreadable)?
            .get(part),
        Some(b'[') => match part.parse::<usize>() {
            Ok(index) => serde_json::from_str::<Vec<&RawValue>>(text)
                .map_err(|_| Unreadable)?
                .get(index)
                .copied(),
            Err(_) => None,
        },
        _ => None,
    })
}

/// An object's entries, keys borrowed from the reply unless they hold escapes.
struct Entries<'a>(Vec<(std::borrow::Cow<'a, str>, &'a RawValue)>);

impl<'a> Entries<'a> {
    /// A key given twice: the last one counts, as in a parsed object.
    fn get(&self, key: &str) -> Option<&'a RawValue> {
        self.0.iter().rev().find(|(k, _)| k == key).map(|(_, v)| *v)
    }
}

impl<'de> serde::Deserialize<'de> for Entries<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Entries<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Entries<'de>, A::Error> {
                let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(4));
                while let Some(Key(key)) = map.next_key()? {
                    entries.push((key, map.next_value()?));
                }
                Ok(Entries(entries))
            }
        }
        deserializer.deserialize_map(Visit)
    }
}

/// A key, borrowed from the reply unless it holds escapes.
#[derive(serde::Deserialize)]
struct Key<'a>(#[serde(borrow)] std::borrow::Cow<'a, str>);

fn price_of(value: &Value) -> Option<Price> {
    match value {
        Value::Number(n) => Price::parse_decimal(&n.to_string()).ok(),
        Value::String(s) => Price::parse_decimal(s).ok(),
        _ => None,
    }
}

pub fn parse_ping_reply(status: u16, body: &[u8], mapping: &ReplyMapping) -> PingReply {
    if !(200..300).contains(&status) {
        return PingReply::NoBid(NoBid::HttpStatus);
    }
    let Some(reply) = Reply::parse(body) else {
        return PingReply::NoBid(NoBid::BadBody);
    };
    let bid = match reply.get(&mapping.bid_path) {
        Ok(Some(bid)) => bid,
        Ok(None) => return PingReply::NoBid(NoBid::Declined),
        Err(Unreadable) => return PingReply::NoBid(NoBid::BadBody),
    };
    match bid {
        Value::Null | Value::Bool(false) => PingReply::NoBid(NoBid::Declined),
        other => match price_of(&other) {
            Some(price) if price.is_zero() => PingReply::NoBid(NoBid::Declined),
            Some(price) => {
                let token = match reply.get(&mapping.token_path) {
                    Ok(Some(Value::Null) | None) => None,
                    Ok(Some(token)) => Some(token),
                    Err(Unreadable) => return PingReply::NoBid(NoBid::BadBody),
                };
                PingReply::Bid { price, token }
            }
            None => PingReply::NoBid(NoBid::BadBody),
        },
    }
}

pub fn parse_post_reply(status: u16, body: &[u8], mapping: &ReplyMapping) -> PostReply {
    if !(200..300).contains(&status) {
        return PostReply::Refused(Refusal::HttpStatus, None);
    }
    let Some(reply) = Reply::parse(body) else {
        return PostReply::Refused(Refusal::BadBody, None);
    };
    let (Ok(reason), Ok(accept)) = (reply.get("reason"), reply.get(&mapping.accept_path)) else {
        return PostReply::Refused(Refusal::BadBody, None);
    };
    let reason = reason
        .as_ref()
        .and_then(|r| r.as_str())
        .map(|r| r.chars().take(200).collect());
    let accepted = match (accept, &mapping.accept_value) {
        (Some(Value::Bool(b)), None) => b,
        (Some(v), Some(expected)) => match v {
            Value::String(s) => s.eq_ignore_ascii_case(expected),
            Value::Bool(b) => b.to_string().eq_ignore_ascii_case(expected),
            Value::Number(n) => n.to_string() == *expected,
            _ => false,
        },
        (Some(_), None) | (None, _) => return PostReply::Refused(Refusal::BadBody, reason),
    };
    if accepted {
        PostReply::Accepted
    } else {
        PostReply::Refused(Refusal::Declined, reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cents(c: i64) -> PingReply {
        PingReply::Bid {
            price: Price::from_cents(c),
            token: None,
        }
    }

    #[test]
    fn ping_replies() {
        let m = ReplyMapping::default();
        let cases: Vec<(u16, &[u8], PingReply)> = vec![
            (200, br#"{"bid": 12.5}"#, cents(1250)),
            (200, br#"{"bid": "12.50"}"#, cents(1250)),
            (200, br#"{"bid": "$7"}"#, cents(700)),
            (200, br#"{"bid": 0}"#, PingReply::NoBid(NoBid::Declined)),
            (200, br#"{"bid": null}"#, PingReply::NoBid(NoBid::Declined)),
            (200, br#"{}"#, PingReply::NoBid(NoBid::Declined)),
            (200, br#"{"bid": "lots"}"#, PingReply::NoBid(NoBid::BadBody)),
            (200, br#"{"bid": -3}"#, PingReply::NoBid(NoBid::BadBody)),
            (200, b"<html>oops</html>", PingReply::NoBid(NoBid::BadBody)),
            (200, b"", PingReply::NoBid(NoBid::BadBody)),
            (500, br#"{"bid": 99}"#, PingReply::NoBid(NoBid::HttpStatus)),
            (
                200,
                br#"{"bid": 3, "token": "abc"}"#,
                PingReply::Bid {
                    price: Price::from_cents(300),
                    token: Some(json!("abc")),
                },
            ),
        ];
        for (status, body, expected) in cases {
            assert_eq!(
                parse_ping_reply(status, body, &m),
                expected,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn post_replies() {
        let m = ReplyMapping::default();
        assert_eq!(
            parse_post_reply(200, br#"{"accepted": true}"#, &m),
            PostReply::Accepted
        );
        assert_eq!(
            parse_post_reply(200, br#"{"accepted": false, "reason": "dup"}"#, &m),
            PostReply::Refused(Refusal::Declined, Some("dup".into()))
        );
        assert_eq!(
            parse_post_reply(200, br#"{"ok": 1}"#, &m),
            PostReply::Refused(Refusal::BadBody, None)
        );
        assert_eq!(
            parse_post_reply(503, b"", &m),
            PostReply::Refused(Refusal::HttpStatus, None)
        );
        assert_eq!(
            parse_post_reply(200, b"yes", &m),
            PostReply::Refused(Refusal::BadBody, None)
        );
    }

    #[test]
    fn mapped_replies() {
        let m = ReplyMapping {
            bid_path: "data.offer.price".into(),
            token_path: "data.id".into(),
            accept_path: "result".into(),
            accept_value: Some("success".into()),
        };
        assert_eq!(
            parse_ping_reply(
                200,
                br#"{"data": {"offer": {"price": "$12.50"}, "id": 77}}"#,
                &m
            ),
            PingReply::Bid {
                price: Price::from_cents(1250),
                token: Some(json!(77))
            }
        );
        assert_eq!(
            parse_post_reply(200, br#"{"result": "SUCCESS"}"#, &m),
            PostReply::Accepted
        );
        assert_eq!(
            parse_post_reply(200, br#"{"result": "failure"}"#, &m),
            PostReply::Refused(Refusal::Declined, None)
        );
    }

    #[test]
    fn replies_are_read_along_the_mapped_paths_only() {
        let m = ReplyMapping {
            bid_path: "offers.1.price".into(),
            token_path: "id".into(),
            ..ReplyMapping::default()
        };
        // Escaped keys, a key given twice (the last counts) and array indexes on the way.
        let body = br#"{"i\u0064": "first", "offers": [{"price": 1}, {"pr\u0069ce": "9.50"}], "id": "t-7"}"#;
        assert_eq!(
            parse_ping_reply(200, body, &m),
            PingReply::Bid {
                price: Price::from_cents(950),
                token: Some(json!("t-7"))
            }
        );
        let twice = br#"{"bid": 3, "note": {"deep": [1, 2, {"x": null}]}, "bid": 4}"#;
        assert_eq!(
            parse_ping_reply(200, twice, &ReplyMapping::default()),
            cents(400)
        );
        assert_eq!(
            parse_ping_reply(200, br#"{"offers": {"1": {"price": 2}}}"#, &m),
            cents(200),
            "a numeric part names an object's key too"
        );
        assert_eq!(
            parse_ping_reply(200, br#"{"offers": "none"}"#, &m),
            PingReply::NoBid(NoBid::Declined)
        );
        // A number too large for a JSON value makes the reply bad where it is read, and only
        // there.
        let far = br#"{"bid": 1e999}"#;
        assert_eq!(
            parse_ping_reply(200, far, &ReplyMapping::default()),
            PingReply::NoBid(NoBid::BadBody)
        );
        let aside = br#"{"bid": 2, "debug": 1e999}"#;
        assert_eq!(
            parse_ping_reply(200, aside, &ReplyMapping::default()),
            cents(200)
        );
        assert_eq!(
            parse_ping_reply(200, br#"{"bid": 2} {"bid": 3}"#, &ReplyMapping::default()),
            PingReply::NoBid(NoBid::BadBody)
        );
        assert_eq!(
            parse_post_reply(
                200,
                br#"{"reason": 1e999, "accepted": true}"#,
                &ReplyMapping::default()
            ),
            PostReply::Refused(Refusal::BadBody, None)
        );
    }

    #[test]
    fn bodies_follow_the_contract() {
        let lead: FieldMap =
            serde_json::from_value(json!({"state": "TX", "homeowner": "yes"})).unwrap();
        let ping: Value =
            serde_json::from_slice(&ping_body("p1", "acme-auto", "Auto Insurance", &lead)).unwrap();
        assert_eq!(
            ping,
            json!({"ping_id": "p1", "campaign": "acme-auto", "category": "Auto Insurance", "lead": {"state": "TX", "homeowner": "yes"}})
        );
        let post = post_body(&PostRequest {
            ping_id: "p1",
            lead_id: "L1",
            price: Price::from_cents(4500),
            token: Some(&json!("t")),
            campaign: "acme-auto",
            category: "Auto Insurance",
            lead: &lead,
        });
        let text = String::from_utf8(post).unwrap();
        assert!(text.contains(r#""price":45.00"#), "{text}");
        assert!(text.contains(r#""token":"t""#), "{text}");
    }

    #[test]
    fn a_token_is_echoed_as_the_buyer_sent_it() {
        let lead = FieldMap::default();
        for token in [
            json!("t-1"),
            json!(12345),
            json!({"offer": [1, "a"]}),
            json!(true),
        ] {
            let reply = serde_json::to_vec(&json!({"bid": 5, "token": token})).unwrap();
            let PingReply::Bid {
                token: Some(read), ..
            } = parse_ping_reply(200, &reply, &ReplyMapping::default())
            else {
                panic!("a bid with its token: {token}");
            };
            assert_eq!(read, token);
            let post = post_body(&PostRequest {
                ping_id: "p1",
                lead_id: "L1",
                price: Price::from_cents(500),
                token: Some(&read),
                campaign: "acme-auto",
                category: "Auto Insurance",
                lead: &lead,
            });
            let post: Value = serde_json::from_slice(&post).unwrap();
            assert_eq!(post["token"], token);
        }
        let reply = br#"{"bid": 5, "token": null}"#;
        assert_eq!(
            parse_ping_reply(200, reply, &ReplyMapping::default()),
            PingReply::Bid {
                price: Price::from_cents(500),
                token: None
            }
        );
    }

    /// Every file in `tests/fixtures/replies` is one odd reply: the mapping (defaults when
    /// absent), the status, the body (`body` as JSON or `body_text` as sent) and what the
    /// exchange must read from it.
    #[test]
    fn reply_fixtures() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/replies");
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .expect("fixture folder")
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        files.sort();
        assert!(files.len() >= 20, "fixtures found: {}", files.len());
        for file in files {
            let name = file.file_name().unwrap().to_string_lossy().into_owned();
            let case: Value = serde_json::from_slice(&std::fs::read(&file).unwrap())
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            let default = ReplyMapping::default();
            let text = |key: &str, fallback: &str| {
                case["mapping"][key].as_str().unwrap_or(fallback).to_owned()
            };
            let mapping = ReplyMapping {
                bid_path: text("bid_path", &default.bid_path),
                token_path: text("token_path", &default.token_path),
                accept_path: text("accept_path", &default.accept_path),
                accept_value: case["mapping"]["accept_value"].as_str().map(str::to_owned),
            };
            let status = case["status"].as_u64().unwrap() as u16;
            let body = match (&case["body"], case["body_text"].as_str()) {
                (_, Some(text)) => text.as_bytes().to_vec(),
                (json, None) => serde_json::to_vec(json).unwrap(),
            };
            let expect = &case["expect"];
            match case["kind"].as_str().unwrap() {
                "ping" => {
                    let wanted = match expect["bid"].as_str() {
                        Some(price) => PingReply::Bid {
                            price: Price::parse_decimal(price).unwrap(),
                            token: expect.get("token").cloned(),
                        },
                        None => {
                            let why = expect["no_bid"].as_str().unwrap();
                            let all = [
                                NoBid::Declined,
                                NoBid::HttpStatus,
                                NoBid::BadBody,
                                NoBid::Timeout,
                                NoBid::Transport,
                                NoBid::Overloaded,
                            ];
                            PingReply::NoBid(*all.iter().find(|n| n.as_str() == why).unwrap())
                        }
                    };
                    assert_eq!(parse_ping_reply(status, &body, &mapping), wanted, "{name}");
                }
                "post" => {
                    let got = parse_post_reply(status, &body, &mapping);
                    if expect["accepted"] == json!(true) {
                        assert_eq!(got, PostReply::Accepted, "{name}");
                    } else {
                        let PostReply::Refused(why, reason) = got else {
                            panic!("{name}: accepted, expected a refusal");
                        };
                        assert_eq!(why.as_str(), expect["refused"].as_str().unwrap(), "{name}");
                        assert_eq!(reason.as_deref(), expect["reason"].as_str(), "{name}");
                    }
                }
                other => panic!("{name}: unknown kind {other}"),
            }
        }
    }
}

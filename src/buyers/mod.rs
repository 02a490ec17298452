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
    token: Option<&'a str>,
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
    pub token: Option<&'a str>,
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
    Bid { price: Price, token: Option<String> },
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

/// Follows a dotted path (`data.offer.price`; numeric parts index arrays).
fn lookup<'a>(value: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.')
        .filter(|p| !p.is_empty())
        .try_fold(value, |v, part| match v {
            Value::Object(map) => map.get(part),
            Value::Array(items) => part.parse::<usize>().ok().and_then(|i| items.get(i)),
            _ => None,
        })
}

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
    let Ok(json) = serde_json::from_slice::<Value>(body) else {
        return PingReply::NoBid(NoBid::BadBody);
    };
    let Some(raw) = lookup(&json, &mapping.bid_path) else {
        return PingReply::NoBid(NoBid::Declined);
    };
    match raw {
        Value::Null | Value::Bool(false) => PingReply::NoBid(NoBid::Declined),
        other => match price_of(other) {
            Some(price) if price.is_zero() => PingReply::NoBid(NoBid::Declined),
            Some(price) => {
                let token = lookup(&json, &mapping.token_path).and_then(|t| match t {
                    Value::String(s) => Some(s.clone()),
                    Value::Number(n) => Some(n.to_string()),
                    _ => None,
                });
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
    let Ok(json) = serde_json::from_slice::<Value>(body) else {
        return PostReply::Refused(Refusal::BadBody, None);
    };
    let reason = lookup(&json, "reason")
        .and_then(|r| r.as_str())
        .map(|r| r.chars().take(200).collect());
    let accepted = match (lookup(&json, &mapping.accept_path), &mapping.accept_value) {
        (Some(Value::Bool(b)), None) => *b,
        (Some(v), Some(expected)) => match v {
            Value::String(s) => s.eq_ignore_ascii_case(expected),
            Value::Bool(b) => b.to_string() == *expected,
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
                    token: Some("abc".into()),
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
                token: Some("77".into())
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
            token: Some("t"),
            campaign: "acme-auto",
            category: "Auto Insurance",
            lead: &lead,
        });
        let text = String::from_utf8(post).unwrap();
        assert!(text.contains(r#""price":45.00"#), "{text}");
        assert!(text.contains(r#""token":"t""#), "{text}");
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
                            token: expect["token"].as_str().map(str::to_owned),
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

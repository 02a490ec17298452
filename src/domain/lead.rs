//! A lead as the exchange trusts it: parsed once at the edge into newtypes, with every field
//! the supplier sent kept (normalised where the exchange knows the field) for buyers.

use indexmap::IndexMap;
use serde_json::Value;

/// The fields of a lead as they came, in their order. Values stay JSON values because unknown
/// fields (`homeowner`, `creditScore`, ...) are passed on to buyers exactly as sent. Hashed
/// with foldhash (randomly seeded, as hashbrown's own maps are) rather than SipHash: every
/// lead is built, looked up and copied through this map several times, and a body's size
/// bounds how many keys a supplier can send.
pub type FieldMap = IndexMap<String, Value, foldhash::fast::RandomState>;

pub const SELLER: &str = "seller";
pub const CATEGORY: &str = "category";
pub const FIRST_NAME: &str = "firstName";
pub const LAST_NAME: &str = "lastName";
pub const PHONE: &str = "phone";
pub const STATE: &str = "state";
pub const EMAIL: &str = "email";
pub const ZIP: &str = "zip";

/// Always required, whatever the campaign, in the supplier document's order.
pub const ALWAYS_REQUIRED: [&str; 6] = [SELLER, CATEGORY, FIRST_NAME, LAST_NAME, PHONE, STATE];

/// Never sent in a ping (CONTRACT §3); a campaign may add more.
pub const PERSONAL_FIELDS: [&str; 5] = [FIRST_NAME, LAST_NAME, EMAIL, PHONE, "address"];

/// US states, DC and the inhabited territories.
const US_STATES: [&str; 56] = [
    "AL", "AK", "AZ", "AR", "CA", "CO", "CT", "DE", "FL", "GA", "HI", "ID", "IL", "IN", "IA", "KS",
    "KY", "LA", "ME", "MD", "MA", "MI", "MN", "MS", "MO", "MT", "NE", "NV", "NH", "NJ", "NM", "NY",
    "NC", "ND", "OH", "OK", "OR", "PA", "RI", "SC", "SD", "TN", "TX", "UT", "VT", "VA", "WA", "WV",
    "WI", "WY", "DC", "PR", "VI", "GU", "AS", "MP",
];

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UsState(String);

impl UsState {
    pub fn parse(text: &str) -> Option<UsState> {
        let upper = text.trim().to_ascii_uppercase();
        US_STATES
            .contains(&upper.as_str())
            .then_some(UsState(upper))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A dialable US number: exactly ten digits once punctuation and a leading country code 1
/// are dropped. Punctuation is any ASCII punctuation, any white space and the dashes, dots
/// and brackets of other scripts (`555–123–4567` with en dashes, as a word processor writes
/// it); a letter, or any other character, makes the number invalid.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Phone(String);

impl Phone {
    pub fn parse(text: &str) -> Option<Phone> {
        let mut digits = String::with_capacity(11);
        for c in text.trim().chars() {
            match c {
                '0'..='9' => digits.push(c),
                c if is_phone_punctuation(c) => {}
                _ => return None,
            }
        }
        if digits.len() == 11 && digits.starts_with('1') {
            digits.remove(0);
        }
        (digits.len() == 10).then_some(Phone(digits))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Dropped from a phone number: ASCII punctuation, white space (a tab, a no-break space),
/// the General Punctuation block's dashes, dots and spaces (U+2010–U+205F), and the
/// full-width forms of `(`, `)`, `+`, `-`, `.` and `/`.
fn is_phone_punctuation(c: char) -> bool {
    c.is_ascii_punctuation()
        || c.is_whitespace()
        || ('\u{2010}'..='\u{205F}').contains(&c)
        || matches!(
            c,
            '\u{FF08}'
                | '\u{FF09}'
                | '\u{FF0B}'
                | '\u{FF0D}'
                | '\u{FF0E}'
                | '\u{FF0F}'
                | '\u{2212}'
        )
}

/// An email address trimmed, lower-cased and checked for shape (local@domain.tld).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Email(String);

impl Email {
    pub fn parse(text: &str) -> Option<Email> {
        let email = text.trim().to_lowercase();
        if email.len() > 254 || email.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return None;
        }
        let (local, domain) = email.split_once('@')?;
        if local.is_empty() || local.len() > 64 || domain.contains('@') {
            return None;
        }
        if local.starts_with('.') || local.ends_with('.') || local.contains("..") {
            return None;
        }
        let labels: Vec<&str> = domain.split('.').collect();
        if labels.len() < 2 {
            return None;
        }
        let label_ok = |l: &&str| {
            !l.is_empty()
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_alphanumeric() || c == '-')
        };
        if !labels.iter().all(label_ok) {
            return None;
        }
        let tld = labels.last()?;
        if tld.len() < 2 || tld.chars().all(|c| c.is_ascii_digit()) {
            return None;
        }
        Some(Email(email))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A US ZIP code: five digits, or ZIP+4 written `12345-6789` (nine bare digits are
/// normalised to that form).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Zip(String);

impl Zip {
    pub fn parse(text: &str) -> Option<Zip> {
        let text = text.trim();
        if !text.is_ascii() {
            // Every form below is ASCII; checking first keeps the byte offsets below on
            // character boundaries.
            return None;
        }
        let all_digits = |s: &str| s.chars().all(|c| c.is_ascii_digit());
        match text.len() {
            5 if all_digits(text) => Some(Zip(text.to_owned())),
            9 if all_digits(text) => Some(Zip(format!("{}-{}", &text[..5], &text[5..]))),
            10 => {
                let (five, rest) = text.split_at(5);
                let four = rest.strip_prefix('-')?;
                (all_digits(five) && all_digits(four)).then(|| Zip(text.to_owned()))
            }
            _ => None,
        }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// The five-digit part, for prefix filters.
    pub fn five(&self) -> &str {
        &self.0[..5]
    }
}

/// What is wrong with a submission: every missing and every invalid field, in the order the
/// supplier would read them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldErrors {
    pub missing: Vec<String>,
    pub invalid: Vec<String>,
}

impl FieldErrors {
    pub fn is_empty(&self) -> bool {
        self.missing.is_empty() && self.invalid.is_empty()
    }
    /// Every named field, missing ones first.
    pub fn all_fields(&self) -> Vec<String> {
        self.missing
            .iter()
            .chain(self.invalid.iter())
            .cloned()
            .collect()
    }
}

/// A field value that cannot be read as text (object, array, boolean).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotText;

/// A field's value as text: strings trimmed, numbers written out; `None` when blank or null.
pub fn text_value(value: Option<&Value>) -> Result<Option<String>, NotText> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => {
            let t = s.trim();
            Ok((!t.is_empty()).then(|| t.to_owned()))
        }
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(_) => Err(NotText),
    }
}

/// The fields the exchange reads and normalises; every other field is passed on as sent.
fn is_known(name: &str) -> bool {
    ALWAYS_REQUIRED.contains(&name) || name == EMAIL || name == ZIP
}

/// Whether a field the exchange does not know counts as given: not absent, null, blank
/// text, or an empty list or object.
fn is_present(value: Option<&Value>) -> bool {
    match value {
        None | Some(Value::Null) => false,
        Some(Value::String(s)) => !s.trim().is_empty(),
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
        Some(Value::Bool(_) | Value::Number(_)) => true,
    }
}

/// A validated lead. Past this type nothing re-checks the known fields.
#[derive(Debug, Clone, PartialEq)]
pub struct Lead {
    pub seller: String,
    pub category: String,
    pub first_name: String,
    pub last_name: String,
    pub phone: Phone,
    pub state: UsState,
    pub email: Option<Email>,
    pub zip: Option<Zip>,
    /// All fields, known ones replaced by their normalised value.
    pub fields: FieldMap,
}

impl Lead {
    /// Checks the always-required fields, the campaign's `extra_required` ones and the shape
    /// of every known field present, and names every problem at once.
    pub fn parse(mut fields: FieldMap, extra_required: &[String]) -> Result<Lead, FieldErrors> {
        let mut errors = FieldErrors::default();
        let mut required: Vec<&str> = ALWAYS_REQUIRED.to_vec();
        for extra in extra_required {
            if !required.contains(&extra.as_str()) {
                required.push(extra.as_str());
            }
        }
        let mut texts: IndexMap<&str, String, foldhash::fast::RandomState> = IndexMap::default();
        for name in &required {
            if !is_known(name) {
                // A field the exchange does not know is passed on as sent: a campaign that
                // requires it asks only that it be there (`true`, `710`, `"yes"`, `[..]`).
                if !is_present(fields.get(*name)) {
                    errors.missing.push((*name).to_owned());
                }
                continue;
            }
            match text_value(fields.get(*name)) {
                Ok(Some(text)) => {
                    texts.insert(name, text);
                }
                Ok(None) => errors.missing.push((*name).to_owned()),
                Err(NotText) => errors.invalid.push((*name).to_owned()),
            }
        }
        for optional in [EMAIL, ZIP] {
            if texts.contains_key(optional) || required.contains(&optional) {
                continue;
            }
            match text_value(fields.get(optional)) {
                Ok(Some(text)) => {
                    texts.insert(optional, text);
                }
                Ok(None) => {}
                Err(NotText) => errors.invalid.push(optional.to_owned()),
            }
        }

        let invalid = |name: &str, errors: &mut FieldErrors| {
            if !errors.invalid.iter().any(|n| n == name) {
                errors.invalid.push(name.to_owned());
            }
        };
        let phone = texts.get(PHONE).and_then(|t| {
            let parsed = Phone::parse(t);
            if parsed.is_none() {
                invalid(PHONE, &mut errors);
            }
            parsed
        });
        let state = texts.get(STATE).and_then(|t| {
            let parsed = UsState::parse(t);
            if parsed.is_none() {
                invalid(STATE, &mut errors);
            }
            parsed
        });
        let email = texts.get(EMAIL).and_then(|t| {
            let parsed = Email::parse(t);
            if parsed.is_none() {
                invalid(EMAIL, &mut errors);
            }
            parsed
        });
        let zip = texts.get(ZIP).and_then(|t| {
            let parsed = Zip::parse(t);
            if parsed.is_none() {
                invalid(ZIP, &mut errors);
            }
            parsed
        });
        if !errors.is_empty() {
            return Err(errors);
        }
        let (Some(phone), Some(state)) = (phone, state) else {
            unreachable!("required fields were checked above");
        };
        let text = |name: &str| texts.get(name).cloned().unwrap_or_default();
        let (seller, category) = (text(SELLER), text(CATEGORY));
        let (first_name, last_name) = (text(FIRST_NAME), text(LAST_NAME));

        for (name, value) in [
            (FIRST_NAME, first_name.clone()),
            (LAST_NAME, last_name.clone()),
            (PHONE, phone.as_str().to_owned()),
            (STATE, state.as_str().to_owned()),
        ] {
            fields.insert(name.to_owned(), Value::String(value));
        }
        if let Some(email) = &email {
            fields.insert(EMAIL.to_owned(), Value::String(email.as_str().to_owned()));
        }
        if let Some(zip) = &zip {
            fields.insert(ZIP.to_owned(), Value::String(zip.as_str().to_owned()));
        }
        Ok(Lead {
            seller,
            category,
            first_name,
            last_name,
            phone,
            state,
            email,
            zip,
            fields,
        })
    }

    /// The lead as a buyer sees it in a ping: every field but the personal ones.
    pub fn without_personal(&self, extra_personal: &[String]) -> FieldMap {
        self.ping_fields(extra_personal)
            .fields()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// The same fields as `without_personal`, serialised straight from the lead: the ping is
    /// written once per auction and no copy of the lead is needed for it.
    pub fn ping_fields<'a>(&'a self, extra_personal: &'a [String]) -> PingFields<'a> {
        PingFields {
            fields: &self.fields,
            extra_personal,
        }
    }
}

/// A lead's fields without the personal ones, as a JSON object (`Lead::ping_fields`).
pub struct PingFields<'a> {
    fields: &'a FieldMap,
    extra_personal: &'a [String],
}

impl<'a> PingFields<'a> {
    /// `fields` without the standard personal ones and `extra_personal`.
    pub fn of(fields: &'a FieldMap, extra_personal: &'a [String]) -> PingFields<'a> {
        PingFields {
            fields,
            extra_personal,
        }
    }

    fn fields(&self) -> impl Iterator<Item = (&'a String, &'a Value)> + '_ {
        self.fields.iter().filter(|(name, _)| {
            !PERSONAL_FIELDS.contains(&name.as_str())
                && !self.extra_personal.iter().any(|p| p == *name)
        })
    }
}

impl serde::Serialize for PingFields<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.fields())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fields(value: Value) -> FieldMap {
        serde_json::from_value(value).unwrap()
    }

    fn sample() -> Value {
        json!({"seller": "ACME1234", "category": "Auto Insurance", "firstName": " John ",
               "lastName": "Doe", "phone": "1 (555) 123-4567", "state": "tx",
               "email": " John.Doe@Email.COM ", "homeowner": "yes", "creditScore": 710})
    }

    #[test]
    fn normalises_known_fields_and_keeps_unknown_ones() {
        let lead = Lead::parse(fields(sample()), &[]).unwrap();
        assert_eq!(lead.phone.as_str(), "5551234567");
        assert_eq!(lead.state.as_str(), "TX");
        assert_eq!(lead.email.as_ref().unwrap().as_str(), "john.doe@email.com");
        assert_eq!(lead.fields["firstName"], json!("John"));
        assert_eq!(lead.fields["creditScore"], json!(710));
        assert_eq!(lead.fields["homeowner"], json!("yes"));
    }

    #[test]
    fn names_every_missing_and_invalid_field() {
        let err = Lead::parse(
            fields(
                json!({"seller": "ACME1234", "firstName": "", "phone": "555-1234",
                          "state": "XX", "email": "nope"}),
            ),
            &["zip".to_owned()],
        )
        .unwrap_err();
        assert_eq!(
            err.missing,
            vec!["category", "firstName", "lastName", "zip"]
        );
        assert_eq!(err.invalid, vec!["phone", "state", "email"]);
    }

    #[test]
    fn pings_carry_no_personal_field() {
        let lead = Lead::parse(fields(sample()), &[]).unwrap();
        let ping = lead.without_personal(&["homeowner".to_owned()]);
        for name in ["firstName", "lastName", "email", "phone", "homeowner"] {
            assert!(!ping.contains_key(name), "{name}");
        }
        assert!(ping.contains_key("state") && ping.contains_key("creditScore"));
        // What the ping carries is written from the lead itself, with the same fields in the
        // same order.
        let written = serde_json::to_string(&lead.ping_fields(&["homeowner".to_owned()])).unwrap();
        assert_eq!(written, serde_json::to_string(&ping).unwrap());
        assert_eq!(
            written,
            r#"{"seller":"ACME1234","category":"Auto Insurance","state":"TX","creditScore":710}"#
        );
    }

    #[test]
    fn a_required_field_the_exchange_does_not_know_may_be_any_value_but_blank() {
        let required = ["homeowner".to_owned(), "vehicles".to_owned()];
        let mut given = sample();
        given["homeowner"] = json!(true);
        given["vehicles"] = json!([{"year": 2019}]);
        let lead = Lead::parse(fields(given.clone()), &required).unwrap();
        assert_eq!(lead.fields["homeowner"], json!(true));
        assert_eq!(lead.fields["vehicles"], json!([{"year": 2019}]));
        for blank in [json!(null), json!(" "), json!([]), json!({})] {
            given["homeowner"] = blank.clone();
            let err = Lead::parse(fields(given.clone()), &required).unwrap_err();
            assert_eq!(err.missing, vec!["homeowner"], "{blank}");
            assert!(err.invalid.is_empty(), "{blank}");
        }
        // A known field stays text: a boolean first name is invalid, required or not.
        given["homeowner"] = json!(false);
        given["firstName"] = json!(true);
        let err = Lead::parse(fields(given), &required).unwrap_err();
        assert_eq!(err.invalid, vec!["firstName"]);
    }

    #[test]
    fn phone_rules() {
        assert_eq!(Phone::parse("555.123.4567").unwrap().as_str(), "5551234567");
        assert_eq!(
            Phone::parse("+1 555 123 4567").unwrap().as_str(),
            "5551234567"
        );
        assert!(Phone::parse("25551234567").is_none());
        assert!(Phone::parse("555-123-456a").is_none());
        assert!(Phone::parse("555-1234").is_none());
        // Punctuation from word processors, form builders and other keyboards is dropped too.
        for text in [
            "555\u{2013}123\u{2013}4567",
            "555\u{00A0}123\u{00A0}4567",
            "\t(555)\u{2009}123-4567",
            "555_123_4567",
            "555,123,4567",
            "\u{FF08}555\u{FF09}123\u{FF0D}4567",
            "\u{2212}1 555 123 4567",
        ] {
            assert_eq!(
                Phone::parse(text).map(|p| p.as_str().to_owned()),
                Some("5551234567".to_owned()),
                "{text:?}"
            );
        }
        for text in [
            "555-123-4567 ext",
            "555-123-456\u{0665}",
            "555\u{00E9}1234567",
        ] {
            assert!(Phone::parse(text).is_none(), "{text:?}");
        }
    }

    #[test]
    fn zip_and_email_rules() {
        assert_eq!(Zip::parse("75001").unwrap().as_str(), "75001");
        assert_eq!(Zip::parse("750011234").unwrap().as_str(), "75001-1234");
        // Ten bytes whose fifth is inside a character: refused, not split there.
        for text in [
            "1234\u{00E9}6789",
            "1234\u{20AC}123",
            "\u{20AC}\u{20AC}\u{20AC}1",
            "12345\u{2013}678",
        ] {
            assert!(Zip::parse(text).is_none(), "{text:?}");
        }
        assert_eq!(Zip::parse("75001-1234").unwrap().five(), "75001");
        assert!(Zip::parse("7500").is_none() && Zip::parse("75001 1234").is_none());
        assert!(Email::parse("a@b.co").is_some());
        for bad in [
            "a@b", "@b.co", "a b@c.co", "a@@b.co", "a@b..co", "a@.b.co", "a@b.c",
        ] {
            assert!(Email::parse(bad).is_none(), "{bad}");
        }
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn any_punctuated_ten_digit_number_normalises_to_its_digits(
            digits in "[0-9]{10}",
            country in proptest::bool::ANY,
            seps in proptest::collection::vec(prop_oneof![Just(""), Just(" "), Just("-"), Just("."), Just("("), Just(")")], 11),
        ) {
            let mut text = String::new();
            if country { text.push('1'); }
            for (i, d) in digits.chars().enumerate() {
                text.push_str(seps[i]);
                text.push(d);
            }
            let phone = Phone::parse(&text).expect("valid");
            prop_assert_eq!(phone.as_str(), digits.as_str());
            // Normalising twice changes nothing.
            prop_assert_eq!(Phone::parse(phone.as_str()).unwrap(), phone);
        }

        #[test]
        fn phones_with_letters_or_wrong_lengths_are_refused(text in "[0-9a-z]{1,14}") {
            let digits = text.chars().filter(char::is_ascii_digit).count();
            let has_letter = text.chars().any(|c| c.is_ascii_alphabetic());
            let ok = Phone::parse(&text).is_some();
            if has_letter || !(digits == 10 || (digits == 11 && text.starts_with('1'))) {
                prop_assert!(!ok, "{} accepted", text);
            } else {
                prop_assert!(ok, "{} refused", text);
            }
        }

        #[test]
        fn states_are_case_insensitive_and_closed(code in "[a-zA-Z]{2}") {
            let upper = code.to_ascii_uppercase();
            match UsState::parse(&format!(" {code} ")) {
                Some(state) => {
                    prop_assert_eq!(state.as_str(), upper.as_str());
                    prop_assert!(US_STATES.contains(&state.as_str()));
                }
                None => prop_assert!(!US_STATES.contains(&upper.as_str())),
            }
        }

        #[test]
        fn emails_are_trimmed_and_lower_cased(local in "[A-Za-z0-9._+-]{1,20}", domain in "[A-Za-z0-9]{1,10}", tld in "[A-Za-z]{2,6}") {
            let text = format!("  {local}@{domain}.{tld} ");
            if let Some(email) = Email::parse(&text) {
                prop_assert_eq!(email.as_str(), text.trim().to_lowercase());
                prop_assert_eq!(Email::parse(email.as_str()).unwrap(), email.clone());
            } else {
                // Only local parts with dots at the ends or doubled are refused here.
                prop_assert!(local.starts_with('.') || local.ends_with('.') || local.contains(".."), "{} refused", text);
            }
        }

        #[test]
        fn zips_are_five_digits_or_zip_plus_four(text in "[0-9-]{1,11}") {
            let expected = text.len() == 5 && text.chars().all(|c| c.is_ascii_digit())
                || text.len() == 9 && text.chars().all(|c| c.is_ascii_digit())
                || text.len() == 10 && text[..5].chars().all(|c| c.is_ascii_digit()) && &text[5..6] == "-" && text[6..].chars().all(|c| c.is_ascii_digit());
            let parsed = Zip::parse(&text);
            prop_assert_eq!(parsed.is_some(), expected, "{}", text);
            if let Some(zip) = parsed {
                prop_assert_eq!(zip.five(), &text[..5]);
            }
        }

        #[test]
        fn no_text_makes_a_field_rule_panic(text in "\\PC{0,14}") {
            // Any characters, of any width: each rule answers, none panics.
            let _ = (Zip::parse(&text), Phone::parse(&text), Email::parse(&text), UsState::parse(&text));
        }
    }
}

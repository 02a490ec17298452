//! Buyer filters as data and the pure check of a lead against them: states, ZIP prefixes and
//! field conditions (`equals`, `in`, `not_in`, `min`, `max`, `exists`) on any lead field.

use serde_json::Value;

use super::lead::{FieldMap, STATE, ZIP};

/// A value a filter compares with, as written in the config.
#[derive(Debug, Clone, PartialEq)]
pub enum FilterValue {
    Text(String),
    Number(f64),
    Bool(bool),
}

impl FilterValue {
    fn matches(&self, field: &Value) -> bool {
        let Some(text) = field_text(field) else {
            return false;
        };
        match self {
            FilterValue::Number(n) => number_of(&text).is_some_and(|v| v == *n),
            FilterValue::Bool(b) => text.eq_ignore_ascii_case(if *b { "true" } else { "false" }),
            FilterValue::Text(t) => match (number_of(t), number_of(&text)) {
                (Some(a), Some(b)) => a == b,
                _ => t.trim().eq_ignore_ascii_case(&text),
            },
        }
    }
}

/// One condition on one lead field; every part that is set must hold.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FieldFilter {
    pub field: String,
    pub equals: Option<FilterValue>,
    pub one_of: Option<Vec<FilterValue>>,
    pub none_of: Option<Vec<FilterValue>>,
    pub min: Option<f64>,
    pub max: Option<f64>,
    /// `true`: the field must be present and not blank; `false`: absent or blank.
    pub exists: Option<bool>,
}

impl FieldFilter {
    /// `true` when the lead passes. A missing field fails `equals`, `in`, `min` and `max`,
    /// and passes `not_in` (it is in none of the values).
    pub fn admits(&self, fields: &FieldMap) -> bool {
        let value = fields.get(&self.field).filter(|v| field_text(v).is_some());
        if let Some(wanted) = self.exists
            && wanted != value.is_some()
        {
            return false;
        }
        if let Some(expected) = &self.equals
            && !value.is_some_and(|v| expected.matches(v))
        {
            return false;
        }
        if let Some(values) = &self.one_of
            && !value.is_some_and(|v| values.iter().any(|x| x.matches(v)))
        {
            return false;
        }
        if let Some(values) = &self.none_of
            && value.is_some_and(|v| values.iter().any(|x| x.matches(v)))
        {
            return false;
        }
        if self.min.is_some() || self.max.is_some() {
            let Some(number) = value.and_then(field_text).and_then(|t| number_of(&t)) else {
                return false;
            };
            if self.min.is_some_and(|min| number < min) || self.max.is_some_and(|max| number > max)
            {
                return false;
            }
        }
        true
    }
}

/// A field's value as comparable text; `None` when absent, null, blank or not a scalar.
fn field_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => {
            let t = s.trim();
            (!t.is_empty()).then(|| t.to_owned())
        }
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// A number written plainly or with money punctuation (`"700"`, `"1,250.5"`, `"$12"`).
fn number_of(text: &str) -> Option<f64> {
    let t = text.trim();
    let t = t.strip_prefix('$').unwrap_or(t);
    let cleaned: String = t.chars().filter(|c| *c != ',').collect();
    cleaned.parse::<f64>().ok().filter(|n| n.is_finite())
}

/// Everything a buyer asks of a lead before it is pinged.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LeadFilter {
    /// Upper-case state codes; empty means every state.
    pub states: Vec<String>,
    /// Digit prefixes of the five-digit ZIP; empty means any ZIP (or none).
    pub zip_prefixes: Vec<String>,
    pub fields: Vec<FieldFilter>,
}

/// Which part of a filter refused a lead, for the auction log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterMiss {
    State,
    Zip,
    /// The index of the field filter that refused.
    Field(usize),
}

impl LeadFilter {
    pub fn check(&self, fields: &FieldMap) -> Result<(), FilterMiss> {
        if !self.states.is_empty() {
            let state = fields.get(STATE).and_then(field_text);
            if !state.is_some_and(|s| self.states.iter().any(|x| x.eq_ignore_ascii_case(&s))) {
                return Err(FilterMiss::State);
            }
        }
        if !self.zip_prefixes.is_empty() {
            let zip = fields.get(ZIP).and_then(field_text);
            let five = zip.as_deref().map(|z| &z[..z.len().min(5)]);
            if !five.is_some_and(|z| self.zip_prefixes.iter().any(|p| z.starts_with(p.as_str()))) {
                return Err(FilterMiss::Zip);
            }
        }
        match self.fields.iter().position(|f| !f.admits(fields)) {
            Some(index) => Err(FilterMiss::Field(index)),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fields(value: Value) -> FieldMap {
        serde_json::from_value(value).unwrap()
    }

    fn lead() -> FieldMap {
        fields(
            json!({"state": "TX", "zip": "75001-1234", "homeowner": "Yes",
                      "creditScore": 710, "debt": "$1,200", "vehicles": "2", "smoker": false,
                      "notes": "  "}),
        )
    }

    fn field(name: &str) -> FieldFilter {
        FieldFilter {
            field: name.into(),
            ..FieldFilter::default()
        }
    }

    fn text(t: &str) -> FilterValue {
        FilterValue::Text(t.into())
    }

    #[test]
    fn states_and_zip_prefixes() {
        let mut f = LeadFilter {
            states: vec!["CA".into(), "TX".into()],
            ..LeadFilter::default()
        };
        assert_eq!(f.check(&lead()), Ok(()));
        f.states = vec!["CA".into()];
        assert_eq!(f.check(&lead()), Err(FilterMiss::State));
        f.states.clear();
        f.zip_prefixes = vec!["90".into(), "750".into()];
        assert_eq!(f.check(&lead()), Ok(()));
        f.zip_prefixes = vec!["7501".into()];
        assert_eq!(f.check(&lead()), Err(FilterMiss::Zip));
        let mut no_zip = lead();
        no_zip.shift_remove("zip");
        f.zip_prefixes = vec!["7".into()];
        assert_eq!(f.check(&no_zip), Err(FilterMiss::Zip), "no ZIP, no match");
    }

    #[test]
    fn field_conditions() {
        let l = lead();
        let cases: Vec<(FieldFilter, bool)> = vec![
            (
                FieldFilter {
                    equals: Some(text("yes")),
                    ..field("homeowner")
                },
                true,
            ),
            (
                FieldFilter {
                    equals: Some(text("no")),
                    ..field("homeowner")
                },
                false,
            ),
            (
                FieldFilter {
                    equals: Some(FilterValue::Number(2.0)),
                    ..field("vehicles")
                },
                true,
            ),
            (
                FieldFilter {
                    equals: Some(text("710.0")),
                    ..field("creditScore")
                },
                true,
            ),
            (
                FieldFilter {
                    equals: Some(FilterValue::Bool(false)),
                    ..field("smoker")
                },
                true,
            ),
            (
                FieldFilter {
                    equals: Some(text("x")),
                    ..field("missing")
                },
                false,
            ),
            (
                FieldFilter {
                    one_of: Some(vec![text("no"), text("YES")]),
                    ..field("homeowner")
                },
                true,
            ),
            (
                FieldFilter {
                    one_of: Some(vec![text("no")]),
                    ..field("homeowner")
                },
                false,
            ),
            (
                FieldFilter {
                    none_of: Some(vec![text("yes")]),
                    ..field("homeowner")
                },
                false,
            ),
            (
                FieldFilter {
                    none_of: Some(vec![text("no")]),
                    ..field("homeowner")
                },
                true,
            ),
            (
                FieldFilter {
                    none_of: Some(vec![text("no")]),
                    ..field("missing")
                },
                true,
            ),
            (
                FieldFilter {
                    min: Some(600.0),
                    ..field("creditScore")
                },
                true,
            ),
            (
                FieldFilter {
                    min: Some(711.0),
                    ..field("creditScore")
                },
                false,
            ),
            (
                FieldFilter {
                    max: Some(1000.0),
                    ..field("debt")
                },
                false,
            ),
            (
                FieldFilter {
                    min: Some(1000.0),
                    max: Some(1200.0),
                    ..field("debt")
                },
                true,
            ),
            (
                FieldFilter {
                    min: Some(1.0),
                    ..field("homeowner")
                },
                false,
            ),
            (
                FieldFilter {
                    min: Some(1.0),
                    ..field("missing")
                },
                false,
            ),
            (
                FieldFilter {
                    exists: Some(true),
                    ..field("homeowner")
                },
                true,
            ),
            (
                FieldFilter {
                    exists: Some(true),
                    ..field("notes")
                },
                false,
            ),
            (
                FieldFilter {
                    exists: Some(false),
                    ..field("notes")
                },
                true,
            ),
            (
                FieldFilter {
                    exists: Some(false),
                    ..field("creditScore")
                },
                false,
            ),
        ];
        for (filter, expected) in cases {
            assert_eq!(filter.admits(&l), expected, "{filter:?}");
        }
        let f = LeadFilter {
            fields: vec![
                FieldFilter {
                    exists: Some(true),
                    ..field("homeowner")
                },
                FieldFilter {
                    min: Some(800.0),
                    ..field("creditScore")
                },
            ],
            ..LeadFilter::default()
        };
        assert_eq!(f.check(&l), Err(FilterMiss::Field(1)));
    }
}

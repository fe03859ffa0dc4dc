//! Label and field selectors with the grammar and semantics of
//! `k8s.io/apimachinery/pkg/labels` and `pkg/fields`.
use serde_json::{Map, Value};

use super::{resources::Kind, status::ApiError};

#[derive(Debug, Clone, PartialEq)]
enum Op {
    Eq,
    NotEq,
    In,
    NotIn,
    Exists,
    DoesNotExist,
    Gt,
    Lt,
}

#[derive(Debug, Clone, PartialEq)]
struct Requirement {
    key: String,
    op: Op,
    values: Vec<String>,
}

/// A parsed `labelSelector`: requirements that must all hold.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LabelSelector(Vec<Requirement>);

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Ident(String),
    Eq,
    DoubleEq,
    NotEq,
    Not,
    In,
    NotIn,
    Open,
    Close,
    Comma,
    Gt,
    Lt,
}

fn lex(s: &str) -> Vec<Token> {
    let mut out = Vec::new();
    let b: Vec<char> = s.chars().collect();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        match c {
            c if c.is_whitespace() => i += 1,
            '=' if b.get(i + 1) == Some(&'=') => {
                out.push(Token::DoubleEq);
                i += 2;
            }
            '=' => {
                out.push(Token::Eq);
                i += 1;
            }
            '!' if b.get(i + 1) == Some(&'=') => {
                out.push(Token::NotEq);
                i += 2;
            }
            '!' => {
                out.push(Token::Not);
                i += 1;
            }
            '(' => {
                out.push(Token::Open);
                i += 1;
            }
            ')' => {
                out.push(Token::Close);
                i += 1;
            }
            ',' => {
                out.push(Token::Comma);
                i += 1;
            }
            '>' => {
                out.push(Token::Gt);
                i += 1;
            }
            '<' => {
                out.push(Token::Lt);
                i += 1;
            }
            _ => {
                let start = i;
                while i < b.len() && !b[i].is_whitespace() && !"=!(),<>".contains(b[i]) {
                    i += 1;
                }
                let word: String = b[start..i].iter().collect();
                out.push(match word.as_str() {
                    "in" => Token::In,
                    "notin" => Token::NotIn,
                    _ => Token::Ident(word),
                });
            }
        }
    }
    out
}

fn parse_err(s: &str, why: &str) -> ApiError {
    ApiError::bad_request(format!("unable to parse requirement: {why} (in selector {s:?})"))
}

impl LabelSelector {
    /// Parses a selector; errors are the real server's 400 `BadRequest`.
    pub fn parse(s: &str) -> Result<Self, ApiError> {
        let toks = lex(s);
        let mut reqs = Vec::new();
        let mut i = 0;
        let ident = |t: Option<&Token>| match t {
            Some(Token::Ident(w)) => Some(w.clone()),
            // Keywords are plain words where a key or value is expected.
            Some(Token::In) => Some("in".to_owned()),
            Some(Token::NotIn) => Some("notin".to_owned()),
            _ => None,
        };
        while i < toks.len() {
            let req = if toks[i] == Token::Not {
                let key = ident(toks.get(i + 1)).ok_or_else(|| parse_err(s, "found '!', expected: identifier"))?;
                i += 2;
                Requirement { key, op: Op::DoesNotExist, values: vec![] }
            } else {
                let key = ident(toks.get(i)).ok_or_else(|| parse_err(s, "expected: identifier"))?;
                i += 1;
                match toks.get(i) {
                    None | Some(Token::Comma) => Requirement { key, op: Op::Exists, values: vec![] },
                    Some(op @ (Token::Eq | Token::DoubleEq | Token::NotEq | Token::Gt | Token::Lt)) => {
                        let op = match op {
                            Token::NotEq => Op::NotEq,
                            Token::Gt => Op::Gt,
                            Token::Lt => Op::Lt,
                            _ => Op::Eq,
                        };
                        i += 1;
                        // An empty value is allowed: `key=` selects an empty label.
                        let value = match toks.get(i) {
                            None | Some(Token::Comma) => String::new(),
                            t => {
                                i += 1;
                                ident(t).ok_or_else(|| parse_err(s, "expected: identifier after operator"))?
                            }
                        };
                        if matches!(op, Op::Gt | Op::Lt) && value.parse::<i64>().is_err() {
                            return Err(parse_err(s, "for 'Gt', 'Lt' operators, the value must be an integer"));
                        }
                        Requirement { key, op, values: vec![value] }
                    }
                    Some(op @ (Token::In | Token::NotIn)) => {
                        let op = if *op == Token::In { Op::In } else { Op::NotIn };
                        i += 1;
                        if toks.get(i) != Some(&Token::Open) {
                            return Err(parse_err(s, "found '', expected: '('"));
                        }
                        i += 1;
                        let mut values = Vec::new();
                        loop {
                            match toks.get(i) {
                                Some(Token::Close) => {
                                    i += 1;
                                    break;
                                }
                                Some(Token::Comma) => {
                                    // `(a,,b)` and `(a,)` carry an empty value.
                                    if matches!(toks.get(i + 1), Some(Token::Comma | Token::Close)) {
                                        values.push(String::new());
                                    }
                                    i += 1;
                                }
                                t => {
                                    values.push(ident(t).ok_or_else(|| parse_err(s, "found unexpected token, expected: ',' or ')'"))?);
                                    i += 1;
                                }
                            }
                        }
                        if values.is_empty() {
                            return Err(parse_err(s, "for 'in', 'notin' operators, values set can't be empty"));
                        }
                        Requirement { key, op, values }
                    }
                    Some(_) => return Err(parse_err(s, "expected: one of '=', '==', '!=', 'in', 'notin', '>', '<'")),
                }
            };
            if !super::resources::is_label_key(&req.key) {
                return Err(parse_err(s, &format!("invalid label key {:?}", req.key)));
            }
            if let Some(v) = req.values.iter().find(|v| !super::resources::is_label_value(v)) {
                return Err(parse_err(s, &format!("invalid label value: {v:?}")));
            }
            reqs.push(req);
            match toks.get(i) {
                None => {}
                Some(Token::Comma) => {
                    i += 1;
                    if i == toks.len() {
                        return Err(parse_err(s, "found '', expected: identifier after ','"));
                    }
                }
                Some(_) => return Err(parse_err(s, "found unexpected token, expected: ','")),
            }
        }
        Ok(Self(reqs))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether an object with these labels is selected.
    pub fn matches(&self, labels: Option<&Map<String, Value>>) -> bool {
        self.0.iter().all(|r| {
            let v = labels.and_then(|l| l.get(&r.key)).and_then(Value::as_str);
            match r.op {
                Op::Eq => v == Some(r.values[0].as_str()),
                // `!=` and `notin` also select objects without the label.
                Op::NotEq => v != Some(r.values[0].as_str()),
                Op::In => v.is_some_and(|v| r.values.iter().any(|x| x == v)),
                Op::NotIn => v.is_none_or(|v| r.values.iter().all(|x| x != v)),
                Op::Exists => v.is_some(),
                Op::DoesNotExist => v.is_none(),
                Op::Gt | Op::Lt => {
                    let (Some(have), Ok(want)) = (v.and_then(|v| v.parse::<i64>().ok()), r.values[0].parse::<i64>()) else {
                        return false;
                    };
                    if r.op == Op::Gt { have > want } else { have < want }
                }
            }
        })
    }
}

/// A parsed `fieldSelector`: `field=value`, `field==value`, `field!=value`, all of which must hold.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FieldSelector(Vec<(String, bool, String)>);

/// Splits on unescaped commas and unescapes `\,`, `\=`, `\\` as `fields.ParseSelector` does.
fn split_terms(s: &str) -> Vec<String> {
    let mut terms = vec![String::new()];
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                terms.last_mut().expect("term").push('\\');
                if let Some(n) = chars.next() {
                    terms.last_mut().expect("term").push(n);
                }
            }
            ',' => terms.push(String::new()),
            _ => terms.last_mut().expect("term").push(c),
        }
    }
    terms
}

fn unescape(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(n) = chars.next() {
                out.push(n);
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Finds an unescaped operator in a term.
fn find_op(t: &str) -> Option<(usize, &'static str)> {
    let b = t.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' {
            i += 2;
            continue;
        }
        for op in ["!=", "==", "="] {
            if t[i..].starts_with(op) {
                return Some((i, op));
            }
        }
        i += 1;
    }
    None
}

impl FieldSelector {
    /// Parses a selector and checks its fields against those `kind` supports
    /// (the real server answers 400 `field label not supported: X` otherwise).
    pub fn parse(s: &str, kind: Kind) -> Result<Self, ApiError> {
        let mut reqs = Vec::new();
        if s.trim().is_empty() {
            return Ok(Self(reqs));
        }
        for term in split_terms(s) {
            let Some((at, op)) = find_op(&term) else {
                return Err(ApiError::bad_request(format!("invalid selector: '{s}'; can't understand '{term}'")));
            };
            let key = unescape(term[..at].trim());
            let value = unescape(&term[at + op.len()..]);
            if !kind.field_labels().contains(&key.as_str()) {
                return Err(ApiError::bad_request(format!(
                    "Unable to find \"{}, Kind={}\" field label conversion function for \"{key}\": field label not supported: {key}",
                    kind.api_version(),
                    kind.kind()
                )));
            }
            reqs.push((key, op != "!=", value));
        }
        Ok(Self(reqs))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn matches(&self, kind: Kind, obj: &Value) -> bool {
        self.0.iter().all(|(k, eq, v)| (kind.field_value(obj, k) == *v) == *eq)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn sel(s: &str, labels: &Value) -> bool {
        LabelSelector::parse(s).expect("parse").matches(labels.as_object())
    }

    #[test]
    fn label_selector_semantics() {
        let l = json!({ "app": "web", "tier": "front", "n": "5" });
        assert!(sel("app=web", &l));
        assert!(sel("app==web,tier=front", &l));
        assert!(!sel("app=web,tier=back", &l));
        assert!(sel("app!=db", &l));
        assert!(sel("other!=x", &l), "!= selects objects without the label");
        assert!(sel("app in (db, web)", &l));
        assert!(!sel("app notin (db,web)", &l));
        assert!(sel("other notin (x)", &l));
        assert!(sel("app", &l));
        assert!(sel("!other", &l));
        assert!(!sel("!app", &l));
        assert!(sel("n>4,n<6", &l));
        assert!(sel("", &l));
        assert!(LabelSelector::parse("app in (a").is_err());
        assert!(LabelSelector::parse("a=b c").is_err());
        assert!(LabelSelector::parse("app=web,").is_err());
        assert!(LabelSelector::parse("-bad=x").is_err());
    }

    #[test]
    fn field_selector_semantics() {
        let o = json!({ "metadata": { "name": "n1", "namespace": "a" }, "spec": { "type": "NodePort" } });
        let f = FieldSelector::parse("metadata.name=n1,spec.type!=ClusterIP", Kind::Service).expect("parse");
        assert!(f.matches(Kind::Service, &o));
        let f = FieldSelector::parse("metadata.name==n2", Kind::Service).expect("parse");
        assert!(!f.matches(Kind::Service, &o));
        let e = FieldSelector::parse("spec.foo=x", Kind::Service).expect_err("unsupported");
        assert_eq!(e.code, 400);
        assert!(e.message.contains("field label not supported: spec.foo"), "{}", e.message);
    }
}

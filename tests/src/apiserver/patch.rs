//! The three patch formats the real server takes for built-in types:
//! JSON merge patch (RFC 7386), strategic merge patch (merge keys and
//! directives of the served types), and JSON patch (RFC 6902).
use serde_json::{Map, Value};

use super::resources::Kind;

/// `application/merge-patch+json` (RFC 7386).
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let t = target.as_object_mut().expect("object");
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

/// How a list field merges in a strategic merge patch: `None` = replaced
/// whole (atomic), `Some("")` = set of primitives, `Some(key)` = maps merged
/// by that key. From the `patchStrategy`/`patchMergeKey` tags of the types.
fn list_strategy(kind: Kind, path: &[&str]) -> Option<&'static str> {
    match (kind, path) {
        (_, ["metadata", "finalizers"]) | (Kind::Node, ["spec", "podCIDRs"]) => Some(""),
        (_, ["metadata", "ownerReferences"]) => Some("uid"),
        (Kind::Service, ["spec", "ports"]) => Some("port"),
        (Kind::Service | Kind::Node, ["status", "conditions"]) | (Kind::Node, ["status", "addresses"]) => Some("type"),
        _ => None,
    }
}

/// `application/strategic-merge-patch+json` for the served types.
pub fn strategic_merge_patch(kind: Kind, target: &mut Value, patch: &Value) -> Result<(), String> {
    smp_map(kind, &mut Vec::new(), target, patch)
}

fn smp_map<'a>(kind: Kind, path: &mut Vec<&'a str>, target: &mut Value, delta: &'a Value) -> Result<(), String> {
    let Value::Object(p) = delta else {
        *target = delta.clone();
        return Ok(());
    };
    match p.get("$patch").and_then(Value::as_str) {
        Some("replace") => {
            let mut m = p.clone();
            m.remove("$patch");
            *target = Value::Object(m);
            return Ok(());
        }
        Some("delete") => {
            *target = Value::Object(Map::new());
            return Ok(());
        }
        Some(other) => return Err(format!("unknown patch type: {other}")),
        None => {}
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let retain: Option<Vec<String>> = p
        .get("$retainKeys")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).map(str::to_owned).collect());
    for (k, v) in p {
        if k.starts_with("$setElementOrder/") || k == "$retainKeys" {
            continue;
        }
        let t = target.as_object_mut().expect("object");
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(list)), Some(del)) = (t.get_mut(field), v.as_array()) {
                list.retain(|x| !del.contains(x));
            }
            continue;
        }
        if v.is_null() {
            t.remove(k);
            continue;
        }
        if v.get("$patch").and_then(Value::as_str) == Some("delete") {
            t.remove(k);
            continue;
        }
        path.push(k);
        let slot = t.entry(k.clone()).or_insert(Value::Null);
        match v {
            Value::Object(_) => smp_map(kind, path, slot, v)?,
            Value::Array(items) => smp_list(kind, path, slot, items)?,
            _ => *slot = v.clone(),
        }
        path.pop();
    }
    if let Some(keep) = retain {
        target.as_object_mut().expect("object").retain(|k, _| keep.contains(k));
    }
    Ok(())
}

fn smp_list<'a>(kind: Kind, path: &mut Vec<&'a str>, target: &mut Value, items: &'a [Value]) -> Result<(), String> {
    let replace = items.iter().any(|i| i.get("$patch").and_then(Value::as_str) == Some("replace"));
    let strategy = list_strategy(kind, path);
    let clean = |i: &Value| -> Value {
        let mut i = i.clone();
        if let Some(m) = i.as_object_mut() {
            m.remove("$patch");
        }
        i
    };
    match strategy {
        Some(_) if replace => {
            *target = Value::Array(items.iter().filter(|i| i.get("$patch").is_none()).map(clean).collect());
        }
        None => *target = Value::Array(items.iter().map(clean).collect()),
        Some("") => {
            if !target.is_array() {
                *target = Value::Array(Vec::new());
            }
            let list = target.as_array_mut().expect("array");
            for i in items {
                if !list.contains(i) {
                    list.push(i.clone());
                }
            }
        }
        Some(key) => {
            if !target.is_array() {
                *target = Value::Array(Vec::new());
            }
            for item in items {
                let Some(k) = item.get(key) else {
                    return Err(format!("map: {item} does not contain declared merge key: {key}"));
                };
                let list = target.as_array_mut().expect("array");
                let pos = list.iter().position(|x| x.get(key) == Some(k));
                let delete = item.get("$patch").and_then(Value::as_str) == Some("delete");
                match (pos, delete) {
                    (Some(p), true) => {
                        list.remove(p);
                    }
                    (None, true) => {}
                    (Some(p), false) => smp_map(kind, path, &mut list[p], item)?,
                    (None, false) => list.push(clean(item)),
                }
            }
        }
    }
    Ok(())
}

fn unescape_pointer(tok: &str) -> String {
    tok.replace("~1", "/").replace("~0", "~")
}

fn split_pointer(path: &str) -> Result<(String, String), String> {
    let (parent, last) = path.rsplit_once('/').ok_or_else(|| format!("invalid JSON pointer {path:?}"))?;
    Ok((parent.to_owned(), unescape_pointer(last)))
}

fn add(doc: &mut Value, path: &str, value: Value) -> Result<(), String> {
    if path.is_empty() {
        *doc = value;
        return Ok(());
    }
    let (parent, last) = split_pointer(path)?;
    match doc.pointer_mut(&parent) {
        Some(Value::Object(m)) => {
            m.insert(last, value);
            Ok(())
        }
        Some(Value::Array(a)) => {
            let i = if last == "-" { a.len() } else { last.parse::<usize>().map_err(|_| format!("invalid index {last:?}"))? };
            if i > a.len() {
                return Err(format!("index {i} out of bounds"));
            }
            a.insert(i, value);
            Ok(())
        }
        _ => Err(format!("doc is missing path: {path:?}")),
    }
}

fn remove(doc: &mut Value, path: &str) -> Result<Value, String> {
    let (parent, last) = split_pointer(path)?;
    match doc.pointer_mut(&parent) {
        Some(Value::Object(m)) => m.remove(&last).ok_or_else(|| format!("doc is missing key: {path:?}")),
        Some(Value::Array(a)) => {
            let i = last.parse::<usize>().map_err(|_| format!("invalid index {last:?}"))?;
            if i >= a.len() {
                return Err(format!("index {i} out of bounds"));
            }
            Ok(a.remove(i))
        }
        _ => Err(format!("doc is missing path: {path:?}")),
    }
}

/// `application/json-patch+json` (RFC 6902).
pub fn json_patch(doc: &mut Value, ops: &Value) -> Result<(), String> {
    let ops = ops.as_array().ok_or("a JSON patch must be an array of operations")?;
    for op in ops {
        let name = op.get("op").and_then(Value::as_str).ok_or("operation is missing \"op\"")?;
        let path = op.get("path").and_then(Value::as_str).ok_or("operation is missing \"path\"")?;
        let value = || op.get("value").cloned().ok_or_else(|| format!("{name} operation is missing \"value\""));
        let from = || op.get("from").and_then(Value::as_str).ok_or_else(|| format!("{name} operation is missing \"from\""));
        match name {
            "add" => add(doc, path, value()?)?,
            "remove" => {
                remove(doc, path)?;
            }
            "replace" => {
                let slot = doc.pointer_mut(path).ok_or_else(|| format!("replace operation does not apply: doc is missing key: {path}"))?;
                *slot = value()?;
            }
            "move" => {
                let v = remove(doc, from()?)?;
                add(doc, path, v)?;
            }
            "copy" => {
                let v = doc.pointer(from()?).cloned().ok_or_else(|| format!("copy from missing path {path:?}"))?;
                add(doc, path, v)?;
            }
            "test" => {
                if doc.pointer(path) != Some(&value()?) {
                    return Err(format!("testing value {path} failed"));
                }
            }
            other => return Err(format!("Unexpected kind: {other}")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn merge_and_strategic_patches() {
        let mut o = json!({ "metadata": { "labels": { "a": "1", "b": "2" } }, "spec": { "ports": [{ "port": 80, "name": "http" }, { "port": 443, "name": "https" }] } });
        merge_patch(&mut o, &json!({ "metadata": { "labels": { "a": null, "c": "3" } } }));
        assert_eq!(o["metadata"]["labels"], json!({ "b": "2", "c": "3" }));

        let mut s = o.clone();
        strategic_merge_patch(Kind::Service, &mut s, &json!({
            "$setElementOrder/ports": [{ "port": 80 }, { "port": 443 }],
            "spec": { "ports": [{ "port": 443, "targetPort": 8443 }, { "port": 80, "$patch": "delete" }, { "port": 8080, "name": "alt" }] }
        })).expect("smp");
        assert_eq!(s["spec"]["ports"], json!([{ "port": 443, "name": "https", "targetPort": 8443 }, { "port": 8080, "name": "alt" }]));

        // A merge patch replaces lists whole.
        merge_patch(&mut o, &json!({ "spec": { "ports": [{ "port": 1 }] } }));
        assert_eq!(o["spec"]["ports"], json!([{ "port": 1 }]));
    }

    #[test]
    fn json_patch_ops() {
        let mut o = json!({ "metadata": { "labels": { "a": "1" } }, "l": [1, 2] });
        json_patch(&mut o, &json!([
            { "op": "add", "path": "/metadata/labels/b~1c", "value": "2" },
            { "op": "remove", "path": "/metadata/labels/a" },
            { "op": "add", "path": "/l/-", "value": 3 },
            { "op": "replace", "path": "/l/0", "value": 0 },
            { "op": "test", "path": "/l/2", "value": 3 },
        ])).expect("patch");
        assert_eq!(o, json!({ "metadata": { "labels": { "b/c": "2" } }, "l": [0, 2, 3] }));
        assert!(json_patch(&mut o, &json!([{ "op": "remove", "path": "/nope" }])).is_err());
    }
}

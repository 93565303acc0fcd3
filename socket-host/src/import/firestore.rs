//! Reading a Baileys auth state kept in Firestore (instead of a `useMultiFileAuthState` folder).
//!
//! Baileys has no Firestore store of its own; hosts write one, in one of two shapes. Both are accepted, with
//! the names configurable:
//!
//! - **documents** (`--firestore-layout documents`): the tenant's document `COLLECTION/DOC` has a
//!   sub-collection (`--firestore-files`, default `auth`) with one document per file; the document id is the
//!   file name, with or without `.json` (`creds`, `pre-key-5`, `session-5511999990000.0`, ...).
//! - **map** (`--firestore-layout map`): the document `COLLECTION/DOC` itself holds the files, one field per
//!   file name; or, with `--firestore-map-field NAME`, inside that one map field.
//!
//! `auto` (the default) uses the sub-collection when it has documents, the map otherwise.
//!
//! One file's content, in either shape, is one of:
//! - a string: the file's JSON text exactly as `useMultiFileAuthState` writes it;
//! - (map layout) a bytes value: a file that is one Buffer (identity and sender keys), stored natively;
//! - a map with a string field `--firestore-value-field` (default `value`) holding that text;
//! - a map that *is* the file's JSON (Buffers as `{type: "Buffer", data: "<base64>"}` maps, or Firestore bytes
//!   values, which are taken as Buffers).
//!
//! The documents are read over Firestore's REST API: from `FIRESTORE_EMULATOR_HOST` when set, otherwise from
//! `firestore.googleapis.com`, authenticated as the host is: a service account's key (a file or a variable),
//! else Application Default Credentials (gcloud's login, `GOOGLE_APPLICATION_CREDENTIALS`, the metadata
//! server); `--firestore-token` gives an access token instead. File names then go through the same checks as a folder's ([`AuthFiles::insert`]).

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use clap::ValueEnum;
use serde_json::{Map, Value};

use wakeeper_shared::adapters::firestore::FirestoreAuth;

use super::baileys::{AuthFiles, BaileysError, MAX_FILE_BYTES};

/// Which shape the auth state has in Firestore.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Layout {
    /// The sub-collection if it has documents, else the map.
    Auto,
    /// One document per file in a sub-collection of the tenant's document.
    Documents,
    /// One field per file in the tenant's document (or in one map field of it).
    Map,
}

/// Where and how to read.
#[derive(Debug, Clone)]
pub struct FirestoreSource {
    /// Google Cloud project.
    pub project: String,
    /// `COLLECTION/DOC` (any even number of segments: a document path).
    pub document: String,
    /// The shape.
    pub layout: Layout,
    /// Sub-collection of per-file documents.
    pub files_collection: String,
    /// Map field holding the files (map layout); `None`: the document's top-level fields.
    pub map_field: Option<String>,
    /// Field holding a file's JSON text.
    pub value_field: String,
    /// OAuth access token for the real service (ignored by the emulator); else `auth` makes one.
    pub token: Option<String>,
    /// How to authenticate without a token: a service account key, or Application Default Credentials.
    pub auth: FirestoreAuth,
}

/// Largest single HTTP response read.
const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;
/// Deepest Firestore value nesting converted (Firestore itself allows 20).
const MAX_DEPTH: usize = 32;

fn src_err(msg: impl Into<String>) -> BaileysError {
    BaileysError::Source(format!("firestore: {}", msg.into()))
}

/// Checks a document path: non-empty segments, none `.`/`..`, an even number of them.
fn segments(path: &str) -> Result<Vec<&str>, BaileysError> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    if parts.len() < 2 || !parts.len().is_multiple_of(2) {
        return Err(src_err("--from-firestore must name a document: COLLECTION/DOC[/COLLECTION/DOC...]"));
    }
    for p in &parts {
        if p.is_empty() || *p == "." || *p == ".." || p.len() > 1500 || p.chars().any(char::is_control) {
            return Err(src_err("--from-firestore has an empty or invalid path segment"));
        }
    }
    Ok(parts)
}

fn check_field_name(name: &str, flag: &str) -> Result<(), BaileysError> {
    if name.is_empty() || name.len() > 1500 || name.chars().any(char::is_control) {
        return Err(src_err(format!("{flag} is empty or invalid")));
    }
    Ok(())
}

struct Rest {
    http: reqwest::Client,
    base: reqwest::Url,
    /// The `Authorization` header's value.
    authorization: String,
}

impl Rest {
    async fn new(src: &FirestoreSource) -> Result<Self, BaileysError> {
        let http = wakeeper_shared::tls::http_client()
            .timeout(std::time::Duration::from_secs(60))
            .build()
            .map_err(|e| src_err(format!("http client: {e}")))?;
        let (root, authorization) = match std::env::var("FIRESTORE_EMULATOR_HOST").ok().filter(|h| !h.is_empty()) {
            // The emulator takes this token as an administrator's and skips security rules.
            Some(host) => (format!("http://{host}/"), "Bearer owner".to_owned()),
            None => {
                let authorization = match &src.token {
                    Some(t) if !t.is_empty() => format!("Bearer {t}"),
                    _ => src.auth.authorization().await.map_err(|e| {
                        src_err(format!(
                            "no credentials ({e}): give the service account's key (--firestore-credentials-file or \
                             WAKEEPER_IMPORT_FIRESTORE_CREDENTIALS), use Application Default Credentials \
                             (`gcloud auth application-default login`, GOOGLE_APPLICATION_CREDENTIALS, Google \
                             Cloud's metadata server), or pass --firestore-token"
                        ))
                    })?,
                };
                ("https://firestore.googleapis.com/".to_owned(), authorization)
            }
        };
        let mut base = reqwest::Url::parse(&root).map_err(|e| src_err(format!("bad endpoint: {e}")))?;
        base.path_segments_mut().map_err(|_| src_err("bad endpoint"))?.extend([
            "v1",
            "projects",
            &src.project,
            "databases",
            "(default)",
            "documents",
        ]);
        Ok(Self { http, base, authorization })
    }

    fn url(&self, segments: &[&str]) -> reqwest::Url {
        let mut url = self.base.clone();
        url.path_segments_mut().expect("base is a hierarchical url").extend(segments);
        url
    }

    /// GETs `url`; `Ok(None)` on 404. Bounded in size.
    async fn get(&self, url: reqwest::Url) -> Result<Option<Value>, BaileysError> {
        let mut resp = self
            .http
            .get(url)
            .header(reqwest::header::AUTHORIZATION, &self.authorization)
            .send()
            .await
            .map_err(|e| src_err(format!("request failed: {}", e.without_url())))?;
        let status = resp.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(src_err(format!("Firestore answered HTTP {status}")));
        }
        if resp.content_length().is_some_and(|n| n as usize > MAX_RESPONSE_BYTES) {
            return Err(src_err(format!("a response is larger than {} MiB", MAX_RESPONSE_BYTES >> 20)));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| src_err(format!("reading a response: {e}")))? {
            if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
                return Err(src_err(format!("a response is larger than {} MiB", MAX_RESPONSE_BYTES >> 20)));
            }
            body.extend_from_slice(&chunk);
        }
        serde_json::from_slice(&body).map(Some).map_err(|_| src_err("a response is not JSON"))
    }
}

/// Reads the auth state at `src`.
pub async fn read(src: &FirestoreSource) -> Result<AuthFiles, BaileysError> {
    let doc = segments(&src.document)?;
    check_field_name(&src.files_collection, "--firestore-files")?;
    check_field_name(&src.value_field, "--firestore-value-field")?;
    if let Some(f) = &src.map_field {
        check_field_name(f, "--firestore-map-field")?;
    }
    let rest = Rest::new(src).await?;
    let mut files = AuthFiles::default();
    let use_documents = match src.layout {
        Layout::Documents => true,
        Layout::Map => false,
        Layout::Auto => {
            let mut probe = rest.url(&[&doc[..], &[src.files_collection.as_str()]].concat());
            probe.query_pairs_mut().append_pair("pageSize", "1");
            rest.get(probe)
                .await?
                .and_then(|v| v.get("documents").and_then(Value::as_array).map(|d| !d.is_empty()))
                .unwrap_or(false)
        }
    };
    if use_documents {
        read_documents(&rest, &doc, src, &mut files).await?;
        files.notes.push(format!("read from the `{}` sub-collection (one document per file)", src.files_collection));
    } else {
        let document = rest.get(rest.url(&doc)).await?.ok_or_else(|| src_err("the document does not exist"))?;
        let fields = fields_of(&document);
        let holder = match &src.map_field {
            Some(f) => match fields.get(f) {
                Some(v) => match v.get("mapValue") {
                    Some(m) => fields_of(m),
                    None => return Err(src_err(format!("field `{f}` is not a map"))),
                },
                None => return Err(src_err(format!("the document has no field `{f}`"))),
            },
            None => fields,
        };
        for (name, value) in holder {
            let content = file_content(&value, &src.value_field).map_err(|p| bad_file(&name, p))?;
            files.insert(&file_name(&name), content)?;
        }
        files.notes.push("read from the document's map fields (one field per file)".into());
    }
    if files.is_empty() {
        return Err(src_err("no auth-state files found there"));
    }
    Ok(files)
}

async fn read_documents(
    rest: &Rest,
    doc: &[&str],
    src: &FirestoreSource,
    files: &mut AuthFiles,
) -> Result<(), BaileysError> {
    let mut token: Option<String> = None;
    loop {
        let mut url = rest.url(&[doc, &[src.files_collection.as_str()]].concat());
        url.query_pairs_mut().append_pair("pageSize", "300");
        if let Some(t) = &token {
            url.query_pairs_mut().append_pair("pageToken", t);
        }
        let Some(page) = rest.get(url).await? else { break };
        for d in page.get("documents").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default() {
            let id = d
                .get("name")
                .and_then(Value::as_str)
                .and_then(|n| n.rsplit('/').next())
                .ok_or_else(|| src_err("a document without a name"))?;
            let id = percent_decode(id);
            let content = document_content(d, &src.value_field).map_err(|p| bad_file(&id, p))?;
            files.insert(&file_name(&id), content)?;
        }
        match page.get("nextPageToken").and_then(Value::as_str) {
            Some(t) if !t.is_empty() => token = Some(t.to_owned()),
            _ => break,
        }
    }
    Ok(())
}

fn bad_file(name: &str, problem: String) -> BaileysError {
    BaileysError::File { file: name.escape_debug().take(120).collect(), problem }
}

fn file_name(id: &str) -> String {
    if id.ends_with(".json") { id.to_owned() } else { format!("{id}.json") }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%' && i + 2 < bytes.len())
            .then(|| std::str::from_utf8(&bytes[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok()))
            .flatten();
        match escaped {
            Some(b) => {
                out.push(b);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn fields_of(v: &Value) -> Map<String, Value> {
    v.get("fields").and_then(Value::as_object).cloned().unwrap_or_default()
}

/// A per-file document's content.
fn document_content(doc: &Value, value_field: &str) -> Result<Vec<u8>, String> {
    content_of_fields(&fields_of(doc), value_field)
}

/// One map-layout field's content.
fn file_content(value: &Value, value_field: &str) -> Result<Vec<u8>, String> {
    if let Some(s) = value.get("stringValue").and_then(Value::as_str) {
        return Ok(s.as_bytes().to_vec());
    }
    if let Some(b) = value.get("bytesValue").and_then(Value::as_str) {
        // A file that is one Buffer (identity keys, sender keys), stored natively.
        STANDARD.decode(b).map_err(|_| "a bytes value is not base64".to_string())?;
        return Ok(serde_json::to_vec(&serde_json::json!({"type": "Buffer", "data": b})).expect("json serializes"));
    }
    match value.get("mapValue") {
        Some(m) => content_of_fields(&fields_of(m), value_field),
        None => Err("must be a string, bytes or a map".into()),
    }
}

fn content_of_fields(fields: &Map<String, Value>, value_field: &str) -> Result<Vec<u8>, String> {
    if let Some(v) = fields.get(value_field) {
        if let Some(s) = v.get("stringValue").and_then(Value::as_str) {
            return Ok(s.as_bytes().to_vec());
        }
        if let Some(b) = v.get("bytesValue").and_then(Value::as_str) {
            return STANDARD.decode(b).map_err(|_| format!("`{value_field}` is not base64"));
        }
    }
    let mut json = Map::new();
    for (k, v) in fields {
        json.insert(k.clone(), to_json(v, 0)?);
    }
    let out = serde_json::to_vec(&Value::Object(json)).expect("json serializes");
    if out.len() as u64 > MAX_FILE_BYTES {
        return Err(format!("larger than the {} MiB limit", MAX_FILE_BYTES >> 20));
    }
    Ok(out)
}

/// A Firestore REST value as the JSON Baileys would have written (bytes as Buffers).
fn to_json(v: &Value, depth: usize) -> Result<Value, String> {
    if depth > MAX_DEPTH {
        return Err("nested too deeply".into());
    }
    let Some((kind, inner)) = v.as_object().and_then(|o| o.iter().next()) else {
        return Err("a malformed Firestore value".into());
    };
    Ok(match kind.as_str() {
        "nullValue" => Value::Null,
        "booleanValue" => Value::Bool(inner.as_bool().ok_or("a malformed boolean")?),
        "integerValue" => {
            let n: i64 = inner.as_str().and_then(|s| s.parse().ok()).or(inner.as_i64()).ok_or("a malformed integer")?;
            Value::from(n)
        }
        "doubleValue" => Value::from(inner.as_f64().ok_or("a malformed double")?),
        "stringValue" | "timestampValue" | "referenceValue" => Value::String(inner.as_str().unwrap_or_default().into()),
        "bytesValue" => {
            let s = inner.as_str().ok_or("a malformed bytes value")?;
            STANDARD.decode(s).map_err(|_| "a bytes value is not base64")?;
            serde_json::json!({"type": "Buffer", "data": s})
        }
        "arrayValue" => Value::Array(
            inner
                .get("values")
                .and_then(Value::as_array)
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .map(|x| to_json(x, depth + 1))
                .collect::<Result<_, _>>()?,
        ),
        "mapValue" => {
            let mut m = Map::new();
            for (k, x) in fields_of(inner) {
                m.insert(k, to_json(&x, depth + 1)?);
            }
            Value::Object(m)
        }
        other => return Err(format!("unsupported Firestore value type `{other}`")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn document_paths_are_checked() {
        assert_eq!(segments("baileys/tenant-1").unwrap(), vec!["baileys", "tenant-1"]);
        assert_eq!(segments("/a/b/c/d/").unwrap().len(), 4);
        for bad in ["a", "a/b/c", "a//b", "a/..", "a/./b/c", ""] {
            assert!(segments(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn firestore_values_become_baileys_json() {
        let v = serde_json::json!({"mapValue": {"fields": {
            "private": {"bytesValue": "AQI="},
            "n": {"integerValue": "42"},
            "list": {"arrayValue": {"values": [{"stringValue": "x"}, {"booleanValue": true}]}},
            "none": {"nullValue": null}
        }}});
        let content = file_content(&v, "value").unwrap();
        let json: Value = serde_json::from_slice(&content).unwrap();
        assert_eq!(json["private"], serde_json::json!({"type": "Buffer", "data": "AQI="}));
        assert_eq!(json["n"], 42);
        assert_eq!(json["list"], serde_json::json!(["x", true]));
        assert!(json["none"].is_null());

        let text = serde_json::json!({"mapValue": {"fields": {"value": {"stringValue": "{\"a\":1}"}}}});
        assert_eq!(file_content(&text, "value").unwrap(), b"{\"a\":1}");
        assert_eq!(file_content(&serde_json::json!({"stringValue": "[]"}), "value").unwrap(), b"[]");
        assert!(file_content(&serde_json::json!({"integerValue": "1"}), "value").is_err());
        assert!(file_content(&serde_json::json!({"mapValue": {"fields": {"x": {"geoPointValue": {}}}}}), "v").is_err());
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("session-5511.0"), "session-5511.0");
        assert_eq!(percent_decode("a%2Fb"), "a/b");
        assert_eq!(percent_decode("x%"), "x%");
    }
}

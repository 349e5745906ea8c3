//! Manifest parsing and validation: OCI image manifest and index, Docker
//! manifest v2 schema 2 and manifest list, OCI artifacts (`artifactType`,
//! any config media type), and Docker schema 1 (accepted for old clients).

use crate::error::{ApiError, ApiResult};
use orlop_engine::{Digest, DigestAlgorithm};
use serde_json::{json, Map, Value};
use sha2::Digest as _;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_V1: &str = "application/vnd.docker.distribution.manifest.v1+json";
pub const DOCKER_V1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Image,
    Index,
    Schema1,
}

pub fn kind_of(media_type: &str) -> Option<Kind> {
    match media_type {
        OCI_MANIFEST | DOCKER_MANIFEST => Some(Kind::Image),
        OCI_INDEX | DOCKER_LIST => Some(Kind::Index),
        DOCKER_V1 | DOCKER_V1_SIGNED => Some(Kind::Schema1),
        _ => None,
    }
}

/// A descriptor as it appears in a manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
}

/// What validation learned about a manifest.
#[derive(Debug)]
pub struct Parsed {
    pub media_type: String,
    pub kind: Kind,
    /// Distinct blobs the manifest needs (size unknown for schema 1).
    pub blobs: Vec<(Digest, Option<u64>)>,
    /// Distinct child manifests (index, manifest list).
    pub children: Vec<Descriptor>,
    pub subject: Option<Digest>,
    pub artifact_type: Option<String>,
    pub annotations: Option<Value>,
}

fn invalid(why: impl Into<String>) -> ApiError {
    ApiError::ManifestInvalid(why.into())
}

/// The digest of a manifest's bytes, with the algorithm the client asked for.
pub fn digest_of(body: &[u8], alg: DigestAlgorithm) -> ApiResult<Digest> {
    let r = match alg {
        DigestAlgorithm::Sha256 => Digest::new(alg, &sha2::Sha256::digest(body)),
        DigestAlgorithm::Sha512 => Digest::new(alg, &sha2::Sha512::digest(body)),
    };
    r.map_err(|e| ApiError::Internal(e.to_string()))
}

/// The media type without parameters (`; charset=utf-8`).
fn bare(ct: &str) -> &str {
    ct.split(';').next().unwrap_or("").trim()
}

fn descriptor(v: &Value, what: &str) -> ApiResult<Descriptor> {
    let o = v
        .as_object()
        .ok_or_else(|| invalid(format!("{what} is not a descriptor object")))?;
    let media_type = o
        .get("mediaType")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid(format!("{what} has no mediaType")))?
        .to_string();
    let digest = o
        .get("digest")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid(format!("{what} has no digest")))?
        .parse::<Digest>()
        .map_err(|e| invalid(format!("{what}: {e}")))?;
    let size = o
        .get("size")
        .and_then(Value::as_u64)
        .ok_or_else(|| invalid(format!("{what} has no valid size")))?;
    Ok(Descriptor {
        media_type,
        digest,
        size,
    })
}

/// Layers that registries are not expected to hold (they name `urls`).
fn is_foreign(d: &Descriptor, v: &Value) -> bool {
    let t = d.media_type.as_str();
    (t.contains("foreign") || t.contains("nondistributable"))
        && v.get("urls")
            .and_then(Value::as_array)
            .is_some_and(|u| !u.is_empty())
}

fn push_distinct(
    list: &mut Vec<(Digest, Option<u64>)>,
    d: Digest,
    size: Option<u64>,
) -> ApiResult<()> {
    match list.iter().find(|(x, _)| *x == d) {
        Some((_, s)) if *s != size => Err(invalid(format!("{d} is listed with two sizes"))),
        Some(_) => Ok(()),
        None => {
            list.push((d, size));
            Ok(())
        }
    }
}

/// Parses and validates a manifest body against its Content-Type.
pub fn parse(body: &[u8], content_type: Option<&str>) -> ApiResult<Parsed> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| invalid(format!("not valid JSON: {e}")))?;
    let o = v.as_object().ok_or_else(|| invalid("not a JSON object"))?;
    let declared = o.get("mediaType").and_then(Value::as_str);
    let ct = content_type.map(bare).filter(|c| kind_of(c).is_some());
    let media_type = match (declared, ct) {
        (Some(d), Some(c)) if d != c => {
            return Err(invalid(format!(
                "mediaType {d:?} does not match Content-Type {c:?}"
            )))
        }
        (Some(d), _) => d.to_string(),
        (None, Some(c)) => c.to_string(),
        (None, None) => guess(o)?.to_string(),
    };
    let kind = kind_of(&media_type)
        .ok_or_else(|| invalid(format!("unsupported manifest media type {media_type:?}")))?;
    let schema = o.get("schemaVersion").and_then(Value::as_u64);
    let want_schema = if kind == Kind::Schema1 { 1 } else { 2 };
    if schema != Some(want_schema) {
        return Err(invalid(format!(
            "schemaVersion must be {want_schema} for {media_type}"
        )));
    }
    let mut p = Parsed {
        media_type,
        kind,
        blobs: Vec::new(),
        children: Vec::new(),
        subject: None,
        artifact_type: o
            .get("artifactType")
            .and_then(Value::as_str)
            .map(str::to_string),
        annotations: o.get("annotations").filter(|a| a.is_object()).cloned(),
    };
    match kind {
        Kind::Image => image(o, &mut p)?,
        Kind::Index => index(o, &mut p)?,
        Kind::Schema1 => schema1(o, &mut p)?,
    }
    if let Some(s) = o.get("subject") {
        p.subject = Some(descriptor(s, "subject")?.digest);
    }
    Ok(p)
}

/// OCI 1.0 allows a manifest without `mediaType`; tell it by its fields.
fn guess(o: &Map<String, Value>) -> ApiResult<&'static str> {
    if o.get("schemaVersion").and_then(Value::as_u64) == Some(1) {
        Ok(DOCKER_V1_SIGNED)
    } else if o.contains_key("manifests") {
        Ok(OCI_INDEX)
    } else if o.contains_key("config") {
        Ok(OCI_MANIFEST)
    } else {
        Err(invalid(
            "no mediaType and no Content-Type naming a manifest",
        ))
    }
}

fn image(o: &Map<String, Value>, p: &mut Parsed) -> ApiResult<()> {
    let config = o.get("config").ok_or_else(|| invalid("no config"))?;
    let c = descriptor(config, "config")?;
    if p.artifact_type.is_none()
        && c.media_type != "application/vnd.oci.image.config.v1+json"
        && c.media_type != "application/vnd.docker.container.image.v1+json"
    {
        // An artifact whose type is given by its config (OCI 1.1 guidance).
        p.artifact_type = Some(c.media_type.clone());
    }
    push_distinct(&mut p.blobs, c.digest, Some(c.size))?;
    let layers = match o.get("layers") {
        Some(Value::Array(a)) => a.as_slice(),
        None | Some(Value::Null) => &[],
        Some(_) => return Err(invalid("layers is not an array")),
    };
    for (i, l) in layers.iter().enumerate() {
        let d = descriptor(l, &format!("layers[{i}]"))?;
        if !is_foreign(&d, l) {
            push_distinct(&mut p.blobs, d.digest, Some(d.size))?;
        }
    }
    Ok(())
}

fn index(o: &Map<String, Value>, p: &mut Parsed) -> ApiResult<()> {
    let list = o
        .get("manifests")
        .and_then(Value::as_array)
        .ok_or_else(|| invalid("manifests is not an array"))?;
    for (i, m) in list.iter().enumerate() {
        let d = descriptor(m, &format!("manifests[{i}]"))?;
        match p.children.iter().find(|c| c.digest == d.digest) {
            Some(c) if c.size != d.size => {
                return Err(invalid(format!("{} is listed with two sizes", d.digest)))
            }
            Some(_) => {}
            None => p.children.push(d),
        }
    }
    Ok(())
}

fn schema1(o: &Map<String, Value>, p: &mut Parsed) -> ApiResult<()> {
    let layers = o
        .get("fsLayers")
        .and_then(Value::as_array)
        .ok_or_else(|| invalid("schema 1 manifest has no fsLayers"))?;
    for (i, l) in layers.iter().enumerate() {
        let d = l
            .get("blobSum")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid(format!("fsLayers[{i}] has no blobSum")))?
            .parse::<Digest>()
            .map_err(|e| invalid(format!("fsLayers[{i}]: {e}")))?;
        push_distinct(&mut p.blobs, d, None)?;
    }
    Ok(())
}

/// The descriptor of a referrer, as listed by the referrers API.
pub fn referrer_descriptor(p: &Parsed, digest: &Digest, size: u64) -> Vec<u8> {
    let mut d = json!({
        "mediaType": p.media_type,
        "digest": digest.to_string(),
        "size": size,
    });
    if let Some(t) = &p.artifact_type {
        d["artifactType"] = json!(t);
    }
    if let Some(a) = &p.annotations {
        d["annotations"] = a.clone();
    }
    serde_json::to_vec(&d).unwrap_or_default()
}

/// For a client whose `Accept` excludes indexes: the index's linux/amd64
/// child (as Docker clients expect), if any.
pub fn pick_platform(index_body: &[u8]) -> Option<Digest> {
    let v: Value = serde_json::from_slice(index_body).ok()?;
    v.get("manifests")?.as_array()?.iter().find_map(|m| {
        let p = m.get("platform")?;
        let ok = p.get("os")?.as_str()? == "linux" && p.get("architecture")?.as_str()? == "amd64";
        if ok {
            m.get("digest")?.as_str()?.parse().ok()
        } else {
            None
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(i: u8) -> String {
        Digest::sha256_of(&[i]).to_string()
    }

    #[test]
    fn oci_image_manifest() {
        let m = json!({"schemaVersion":2,"mediaType":OCI_MANIFEST,
            "config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":d(1),"size":3},
            "layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":d(2),"size":5},
                      {"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":d(2),"size":5}]});
        let p = parse(
            &serde_json::to_vec(&m).unwrap_or_default(),
            Some(OCI_MANIFEST),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p.kind, Kind::Image);
        assert_eq!(p.blobs.len(), 2, "a repeated layer is one reference");
        assert_eq!(p.artifact_type, None);
    }

    #[test]
    fn rejects_bad_manifests() {
        let cases: Vec<(Vec<u8>, Option<&str>)> = vec![
            (b"not json".to_vec(), Some(OCI_MANIFEST)),
            (b"[1,2]".to_vec(), Some(OCI_MANIFEST)),
            (json!({"schemaVersion":1,"mediaType":OCI_MANIFEST,"config":{}}).to_string().into_bytes(), None),
            (json!({"schemaVersion":2,"mediaType":"text/plain"}).to_string().into_bytes(), None),
            (json!({"schemaVersion":2,"mediaType":OCI_INDEX,"manifests":[]}).to_string().into_bytes(), Some(OCI_MANIFEST)),
            (json!({"schemaVersion":2,"mediaType":OCI_MANIFEST,"config":{"mediaType":"x","digest":"sha256:zz","size":1}}).to_string().into_bytes(), None),
            (json!({"schemaVersion":2,"mediaType":OCI_MANIFEST,"config":{"mediaType":"x","digest":d(1),"size":-1}}).to_string().into_bytes(), None),
            (json!({"schemaVersion":2,"mediaType":OCI_MANIFEST,"config":{"mediaType":"x","digest":d(1),"size":1},"layers":{}}).to_string().into_bytes(), None),
        ];
        for (body, ct) in cases {
            assert!(
                matches!(parse(&body, ct), Err(ApiError::ManifestInvalid(_))),
                "{}",
                String::from_utf8_lossy(&body)
            );
        }
    }

    #[test]
    fn artifacts_index_and_schema1() {
        let art = json!({"schemaVersion":2,"mediaType":OCI_MANIFEST,"artifactType":"application/vnd.example.sbom",
            "config":{"mediaType":"application/vnd.oci.empty.v1+json","digest":d(1),"size":2},
            "layers":[],"subject":{"mediaType":OCI_MANIFEST,"digest":d(9),"size":10}});
        let p = parse(art.to_string().as_bytes(), None).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            p.artifact_type.as_deref(),
            Some("application/vnd.example.sbom")
        );
        assert_eq!(p.subject.map(|s| s.to_string()), Some(d(9)));

        let helm = json!({"schemaVersion":2,
            "config":{"mediaType":"application/vnd.cncf.helm.config.v1+json","digest":d(1),"size":2},
            "layers":[{"mediaType":"application/vnd.cncf.helm.chart.content.v1.tar+gzip","digest":d(2),"size":7}]});
        let p = parse(helm.to_string().as_bytes(), Some(OCI_MANIFEST))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            p.artifact_type.as_deref(),
            Some("application/vnd.cncf.helm.config.v1+json")
        );

        let idx = json!({"schemaVersion":2,"mediaType":DOCKER_LIST,"manifests":[
            {"mediaType":DOCKER_MANIFEST,"digest":d(3),"size":100,"platform":{"os":"linux","architecture":"arm64"}},
            {"mediaType":DOCKER_MANIFEST,"digest":d(4),"size":100,"platform":{"os":"linux","architecture":"amd64"}}]});
        let body = idx.to_string().into_bytes();
        let p = parse(&body, Some(DOCKER_LIST)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((p.kind, p.children.len()), (Kind::Index, 2));
        assert_eq!(pick_platform(&body).map(|d| d.to_string()), Some(d(4)));

        let s1 = json!({"schemaVersion":1,"name":"a","tag":"b","architecture":"amd64",
            "fsLayers":[{"blobSum":d(5)},{"blobSum":d(5)}],"history":[],"signatures":[]});
        let p = parse(s1.to_string().as_bytes(), Some(DOCKER_V1_SIGNED))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((p.kind, p.blobs.len()), (Kind::Schema1, 1));
    }
}

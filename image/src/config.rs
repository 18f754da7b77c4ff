//! The image config: OCI image-spec `config` plus Docker's extra fields
//! (Healthcheck, OnBuild, Shell, ArgsEscaped, ...).
//!
//! Field names follow Docker/OCI exactly. Maps are `BTreeMap`s and the
//! field order is fixed, so serialising the same value always gives the
//! same bytes (and digest). Fields this type does not know are kept in
//! `extra` and written back, so editing a pulled base config loses nothing.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{Digest, ImageError};

/// An empty JSON object, as used in `ExposedPorts` and `Volumes`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Empty {}

/// `HEALTHCHECK` settings. Durations are nanoseconds (Go `time.Duration`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Healthcheck {
    /// `["NONE"]`, `["CMD", args...]` or `["CMD-SHELL", command]`.
    #[serde(rename = "Test", default, skip_serializing_if = "Option::is_none")]
    pub test: Option<Vec<String>>,
    /// Time between checks (ns).
    #[serde(rename = "Interval", default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<i64>,
    /// Time before a check is considered hung (ns).
    #[serde(rename = "Timeout", default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<i64>,
    /// Start period (ns).
    #[serde(
        rename = "StartPeriod",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub start_period: Option<i64>,
    /// Interval during the start period (ns).
    #[serde(
        rename = "StartInterval",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub start_interval: Option<i64>,
    /// Consecutive failures before unhealthy.
    #[serde(rename = "Retries", default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<i64>,
}

/// The runtime defaults of an image (the `config` object).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ContainerConfig {
    /// `USER`.
    #[serde(rename = "User", default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// `EXPOSE` (`"80/tcp": {}`).
    #[serde(
        rename = "ExposedPorts",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub exposed_ports: Option<BTreeMap<String, Empty>>,
    /// `ENV` as `K=V` in order.
    #[serde(rename = "Env", default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<String>>,
    /// `ENTRYPOINT`.
    #[serde(
        rename = "Entrypoint",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub entrypoint: Option<Vec<String>>,
    /// `CMD`.
    #[serde(rename = "Cmd", default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    /// `VOLUME`.
    #[serde(rename = "Volumes", default, skip_serializing_if = "Option::is_none")]
    pub volumes: Option<BTreeMap<String, Empty>>,
    /// `WORKDIR`.
    #[serde(
        rename = "WorkingDir",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub working_dir: Option<String>,
    /// `LABEL`.
    #[serde(rename = "Labels", default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    /// `STOPSIGNAL`.
    #[serde(
        rename = "StopSignal",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub stop_signal: Option<String>,
    /// Windows-only escaping marker Docker sets for shell-form commands.
    #[serde(
        rename = "ArgsEscaped",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub args_escaped: Option<bool>,
    /// `HEALTHCHECK` (Docker extension).
    #[serde(
        rename = "Healthcheck",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub healthcheck: Option<Healthcheck>,
    /// `ONBUILD` triggers, raw instruction text (Docker extension).
    #[serde(rename = "OnBuild", default, skip_serializing_if = "Option::is_none")]
    pub on_build: Option<Vec<String>>,
    /// `SHELL` (Docker extension).
    #[serde(rename = "Shell", default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<Vec<String>>,
    /// Fields not modelled above, kept verbatim.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// The `rootfs` object: the layer diffIDs, base first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootFs {
    /// Always `layers`.
    #[serde(rename = "type")]
    pub kind: String,
    /// sha256 of each uncompressed layer tar.
    pub diff_ids: Vec<Digest>,
}

impl Default for RootFs {
    fn default() -> Self {
        RootFs {
            kind: "layers".to_string(),
            diff_ids: Vec::new(),
        }
    }
}

/// One `history` entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct History {
    /// RFC 3339 time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    /// The instruction, BuildKit style (`RUN /bin/sh -c ...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
    /// Author.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub author: Option<String>,
    /// Free text (BuildKit writes `buildkit.dockerfile.v0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// True when the step produced no layer.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub empty_layer: bool,
}

/// An image config (`application/vnd.oci.image.config.v1+json` /
/// `application/vnd.docker.container.image.v1+json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ImageConfig {
    /// RFC 3339 creation time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    /// `MAINTAINER`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub author: Option<String>,
    /// CPU architecture.
    pub architecture: String,
    /// Operating system.
    pub os: String,
    /// OS version.
    #[serde(
        rename = "os.version",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub os_version: Option<String>,
    /// OS features.
    #[serde(
        rename = "os.features",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub os_features: Option<Vec<String>>,
    /// CPU variant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// Runtime defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<ContainerConfig>,
    /// Layer diffIDs.
    pub rootfs: RootFs,
    /// One entry per build step.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<History>,
    /// Fields not modelled above (`container`, `docker_version`, ...), kept.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl ImageConfig {
    /// An empty config for `platform` (no layers, no history).
    pub fn new(platform: &crate::manifest::Platform) -> Self {
        ImageConfig {
            architecture: platform.architecture.clone(),
            os: platform.os.clone(),
            variant: platform.variant.clone(),
            ..Default::default()
        }
    }
    /// Parse config bytes.
    pub fn from_bytes(b: &[u8]) -> Result<Self, ImageError> {
        check_config_size(b.len() as u64)?;
        Ok(serde_json::from_slice(b)?)
    }
    /// Serialise (compact JSON, fixed order); a config over
    /// [`MAX_CONFIG_SIZE`] is an error.
    pub fn to_bytes(&self) -> Result<Vec<u8>, ImageError> {
        let b = serde_json::to_vec(self)?;
        check_config_size(b.len() as u64)?;
        Ok(b)
    }
    /// The image ID: the digest of the serialised config.
    pub fn digest(&self) -> Result<Digest, ImageError> {
        Ok(Digest::sha256_of(&self.to_bytes()?))
    }
    /// The runtime config, created empty if absent.
    pub fn config_mut(&mut self) -> &mut ContainerConfig {
        self.config.get_or_insert_with(ContainerConfig::default)
    }
    /// Record a layer: its diffID and a history entry.
    pub fn push_layer(&mut self, diff_id: Digest, history: History) {
        self.rootfs.diff_ids.push(diff_id);
        self.history.push(History {
            empty_layer: false,
            ..history
        });
    }
    /// Record a metadata-only step.
    pub fn push_empty(&mut self, history: History) {
        self.history.push(History {
            empty_layer: true,
            ..history
        });
    }
}

/// Format seconds since the epoch as RFC 3339 UTC (`1970-01-01T00:00:00Z`),
/// the form used in `created` fields.
pub fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (h, m, s) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    // civil-from-days (Howard Hinnant)
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if mo <= 2 { y + 1 } else { y };
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}Z")
}

/// The largest image config kiln builds, loads or pulls (one limit for
/// all three). Configs of real images are a few KiB; Docker Hub's largest
/// are well under 1 MiB.
pub const MAX_CONFIG_SIZE: u64 = 8 << 20;

/// An error when a config of `size` bytes is over [`MAX_CONFIG_SIZE`].
pub fn check_config_size(size: u64) -> Result<(), ImageError> {
    if size > MAX_CONFIG_SIZE {
        return Err(ImageError::TooLarge {
            what: "image config".into(),
            size,
            limit: MAX_CONFIG_SIZE,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOCKER_CONFIG: &str = r#"{"architecture":"amd64","config":{"Hostname":"","User":"app","ExposedPorts":{"80/tcp":{}},"Env":["PATH=/usr/bin"],"Cmd":["sh"],"Healthcheck":{"Test":["CMD-SHELL","true"],"Interval":30000000000,"Timeout":5000000000,"StartPeriod":1000000000,"StartInterval":2000000000,"Retries":3},"ArgsEscaped":true,"OnBuild":["RUN echo hi"],"Shell":["/bin/bash","-c"],"StopSignal":"SIGQUIT","Labels":{"a":"b"}},"container":"abc","created":"2024-01-02T03:04:05.123456789Z","docker_version":"24.0.7","history":[{"created":"2024-01-02T03:04:05Z","created_by":"/bin/sh -c #(nop) ADD file:x in / "},{"created":"2024-01-02T03:04:05Z","created_by":"CMD [\"sh\"]","comment":"buildkit.dockerfile.v0","empty_layer":true}],"os":"linux","rootfs":{"type":"layers","diff_ids":["sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"]}}"#;

    #[test]
    fn configs_and_manifests_over_their_limits_are_errors() {
        let mut c = ImageConfig::from_bytes(DOCKER_CONFIG.as_bytes()).expect("parse");
        c.config_mut()
            .labels
            .get_or_insert_with(Default::default)
            .insert("big".into(), "x".repeat(MAX_CONFIG_SIZE as usize));
        assert!(matches!(c.to_bytes(), Err(ImageError::TooLarge { .. })));
        let big = vec![b' '; MAX_CONFIG_SIZE as usize + 1];
        assert!(matches!(
            ImageConfig::from_bytes(&big),
            Err(ImageError::TooLarge { .. })
        ));
        let m = vec![b' '; crate::manifest::MAX_MANIFEST_SIZE as usize + 1];
        assert!(matches!(
            crate::manifest::RawManifest::new(m, Some(crate::manifest::media_types::OCI_MANIFEST)),
            Err(ImageError::TooLarge { .. })
        ));
    }

    #[test]
    fn docker_config_round_trip_keeps_everything() {
        let c = ImageConfig::from_bytes(DOCKER_CONFIG.as_bytes()).expect("parse");
        let cc = c.config.as_ref().expect("config");
        let hc = cc.healthcheck.as_ref().expect("hc");
        assert_eq!(hc.interval, Some(30_000_000_000));
        assert_eq!(hc.start_interval, Some(2_000_000_000));
        assert_eq!(hc.retries, Some(3));
        assert_eq!(
            cc.on_build.as_deref(),
            Some(&["RUN echo hi".to_string()][..])
        );
        assert_eq!(cc.shell.as_ref().map(Vec::len), Some(2));
        assert_eq!(cc.args_escaped, Some(true));
        assert_eq!(cc.stop_signal.as_deref(), Some("SIGQUIT"));
        assert!(cc.extra.contains_key("Hostname"));
        assert!(c.extra.contains_key("docker_version"));
        assert!(c.history[1].empty_layer);
        assert!(!c.history[0].empty_layer);
        // re-serialising gives the same value, and is stable
        let b = c.to_bytes().expect("ser");
        let c2 = ImageConfig::from_bytes(&b).expect("reparse");
        assert_eq!(c, c2);
        assert_eq!(b, c2.to_bytes().expect("ser2"));
        let v: serde_json::Value = serde_json::from_slice(&b).expect("json");
        let orig: serde_json::Value = serde_json::from_str(DOCKER_CONFIG).expect("json");
        assert_eq!(v, orig, "no field lost or renamed");
    }

    #[test]
    fn new_config_shape() {
        let mut c = ImageConfig::new(&crate::manifest::Platform::host());
        c.created = Some(rfc3339(0));
        c.push_layer(
            Digest::sha256_of(b""),
            History {
                created_by: Some("x".into()),
                ..Default::default()
            },
        );
        c.push_empty(History {
            created_by: Some("CMD".into()),
            ..Default::default()
        });
        let v: serde_json::Value =
            serde_json::from_slice(&c.to_bytes().expect("ser")).expect("json");
        assert_eq!(v["created"], "1970-01-01T00:00:00Z");
        assert_eq!(v["rootfs"]["type"], "layers");
        assert_eq!(v["history"][1]["empty_layer"], true);
        assert!(v["history"][0].get("empty_layer").is_none());
    }

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }
}

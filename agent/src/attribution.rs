//! Who a socket belongs to beyond its processes: the container or the systemd unit, read
//! from a cgroup v2 path. Pure string work, table-tested; the path itself comes from the
//! socket's `INET_DIAG_CGROUP_ID` (the OS layer maps id → path) or from an owner's
//! `/proc/PID/cgroup`.
//!
//! Layouts recognised (systemd and cgroupfs drivers):
//! - docker: `…/docker-<64hex>.scope`, `/docker/<64hex>`
//! - containerd (CRI): `…/cri-containerd-<64hex>.scope`
//! - CRI-O: `…/crio-<64hex>.scope`
//! - podman: `…/libpod-<64hex>.scope`, `/libpod_parent/libpod-<64hex>`
//! - Kubernetes cgroupfs: `/kubepods/<qos>/pod<uid>/<64hex>`; pod UID from `pod<uid>` or
//!   `kubepods-<qos>-pod<uid_with_underscores>.slice`
//! - LXC: `/lxc/<name>`, `/lxc.payload.<name>`
//!
//! Runtime helper scopes (`docker-conmon`, `libpod-conmon-`, `crio-conmon-`) are not
//! containers. The innermost container wins (docker-in-docker).

use crate::model::Container;

/// Container (if any) and, only when there is no container, the innermost systemd unit.
pub fn attribute(cgroup_path: &str) -> (Option<Container>, Option<String>) {
    let segments: Vec<&str> = cgroup_path.split('/').filter(|s| !s.is_empty()).collect();
    let pod_uid = segments.iter().rev().find_map(|s| pod_uid(s));
    let mut container = None;
    for (i, seg) in segments.iter().enumerate().rev() {
        let parent = if i > 0 { Some(segments[i - 1]) } else { None };
        if let Some((runtime, id)) = container_segment(seg, parent) {
            container = Some(Container {
                runtime: runtime.to_string(),
                id,
                pod_uid: pod_uid.clone(),
            });
            break;
        }
    }
    if container.is_none()
        && let Some(uid) = pod_uid
    {
        // A pod-level cgroup (pause/sandbox processes) without a container segment.
        container = Some(Container {
            runtime: "kubernetes".to_string(),
            id: String::new(),
            pod_uid: Some(uid),
        });
    }
    if container.is_some() {
        return (container, None);
    }
    let unit = segments
        .iter()
        .rev()
        .find(|s| s.ends_with(".service") || s.ends_with(".scope"))
        .map(|s| s.to_string());
    (None, unit)
}

fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn container_segment(seg: &str, parent: Option<&str>) -> Option<(&'static str, String)> {
    const SCOPES: &[(&str, &str)] = &[
        ("cri-containerd-", "containerd"),
        ("crio-", "cri-o"),
        ("docker-", "docker"),
        ("libpod-", "podman"),
    ];
    if let Some(stem) = seg.strip_suffix(".scope") {
        for &(prefix, runtime) in SCOPES {
            if let Some(id) = stem.strip_prefix(prefix)
                && is_container_id(id)
            {
                return Some((runtime, id.to_string()));
            }
        }
        return None;
    }
    if let Some(id) = seg.strip_prefix("libpod-")
        && is_container_id(id)
    {
        return Some(("podman", id.to_string()));
    }
    if let Some(name) = seg.strip_prefix("lxc.payload.") {
        return Some(("lxc", name.to_string()));
    }
    match parent {
        Some("docker") if is_container_id(seg) => Some(("docker", seg.to_string())),
        Some("lxc") => Some(("lxc", seg.to_string())),
        Some(p) if p.starts_with("pod") && is_container_id(seg) => {
            Some(("kubernetes", seg.to_string()))
        }
        _ => None,
    }
}

/// `pod<uid>` (cgroupfs) or `kubepods-<qos>-pod<uid_with_underscores>.slice` (systemd).
fn pod_uid(seg: &str) -> Option<String> {
    let raw = if let Some(stem) = seg.strip_suffix(".slice") {
        let at = stem.rfind("-pod")?;
        if !stem.starts_with("kubepods") {
            return None;
        }
        &stem[at + 4..]
    } else {
        seg.strip_prefix("pod")?
    };
    let uid = raw.replace('_', "-");
    let looks_like_uid = uid.len() >= 32
        && uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
        && uid.bytes().filter(|&b| b == b'-').count() == 4;
    looks_like_uid.then_some(uid)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "4f1c3d5e6a7b8c9d0e1f2a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f";
    const POD: &str = "0c6a2b8e-1f2d-4e5a-9b7c-3d2e1f0a9b8c";

    #[track_caller]
    fn check(path: &str, container: Option<(&str, &str, Option<&str>)>, unit: Option<&str>) {
        let (c, u) = attribute(path);
        let c = c
            .as_ref()
            .map(|c| (c.runtime.as_str(), c.id.as_str(), c.pod_uid.as_deref()));
        assert_eq!((c, u.as_deref()), (container, unit), "{path}");
    }

    #[test]
    fn containers() {
        check(
            &format!("/system.slice/docker-{ID}.scope"),
            Some(("docker", ID, None)),
            None,
        );
        check(&format!("/docker/{ID}"), Some(("docker", ID, None)), None);
        check(
            &format!("/machine.slice/libpod-{ID}.scope"),
            Some(("podman", ID, None)),
            None,
        );
        check(
            &format!(
                "/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID}.scope/container"
            ),
            Some(("podman", ID, None)),
            None,
        );
        check(
            &format!("/libpod_parent/libpod-{ID}"),
            Some(("podman", ID, None)),
            None,
        );
        check(
            &format!("/system.slice/crio-{ID}.scope"),
            Some(("cri-o", ID, None)),
            None,
        );
        check("/lxc/web01", Some(("lxc", "web01", None)), None);
        check(
            "/lxc.payload.web01/system.slice/nginx.service",
            Some(("lxc", "web01", None)),
            None,
        );
    }

    #[test]
    fn kubernetes() {
        let pod_us = POD.replace('-', "_");
        check(
            &format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{pod_us}.slice/cri-containerd-{ID}.scope"
            ),
            Some(("containerd", ID, Some(POD))),
            None,
        );
        check(
            &format!("/kubepods.slice/kubepods-pod{pod_us}.slice/crio-{ID}.scope"),
            Some(("cri-o", ID, Some(POD))),
            None,
        );
        check(
            &format!("/kubepods/besteffort/pod{POD}/{ID}"),
            Some(("kubernetes", ID, Some(POD))),
            None,
        );
        // Pod-level cgroup only.
        check(
            &format!("/kubepods/burstable/pod{POD}"),
            Some(("kubernetes", "", Some(POD))),
            None,
        );
    }

    #[test]
    fn helper_scopes_are_not_containers() {
        check(
            &format!("/machine.slice/libpod-conmon-{ID}.scope"),
            None,
            Some(&format!("libpod-conmon-{ID}.scope")),
        );
        check("/system.slice/docker.service", None, Some("docker.service"));
    }

    #[test]
    fn units() {
        check("/system.slice/nginx.service", None, Some("nginx.service"));
        check(
            "/system.slice/system-getty.slice/getty@tty1.service",
            None,
            Some("getty@tty1.service"),
        );
        check(
            "/user.slice/user-1000.slice/user@1000.service/app.slice/app-foo.service",
            None,
            Some("app-foo.service"),
        );
        check(
            "/user.slice/user-1000.slice/session-3.scope",
            None,
            Some("session-3.scope"),
        );
        check("/init.scope", None, Some("init.scope"));
        check("/", None, None);
        check("/system.slice", None, None);
        check("", None, None);
    }

    #[test]
    fn near_misses() {
        // Not 64 hex digits.
        check(
            "/system.slice/docker-abc.scope",
            None,
            Some("docker-abc.scope"),
        );
        check("/docker/not-an-id", None, None);
        check("/pod/xyz", None, None);
    }
}

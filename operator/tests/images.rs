//! The container images, checked offline (there is no Docker engine in CI): each Dockerfile in
//! `docker/` builds its package with CI's cargo command and features, copies that package's own
//! binary into a runtime stage that runs it as non-root, and is tagged with the name the chart and
//! the examples deploy; the runtime stage installs the shared libraries the binary links and
//! nothing else. And the operator image does not carry the broker: `ferrymq-operator`'s normal
//! dependencies (what `cargo build --release -p ferrymq-operator` compiles) do not reach
//! `ferrymq-broker`.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

/// A Dockerfile's instructions, continuation lines joined, comments left out.
fn instructions(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if current.is_empty() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(head) => {
                current.push_str(head.trim_end());
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                out.push(std::mem::take(&mut current));
            }
        }
    }
    out
}

/// The instructions of the last stage (the image that ships), from its `FROM` on.
fn runtime_stage(steps: &[String]) -> &[String] {
    let at = steps
        .iter()
        .rposition(|s| s.starts_with("FROM "))
        .expect("a FROM");
    &steps[at..]
}

/// The `cargo build` of CI's release build (.ci/run's bench phase), as words.
fn ci_release_build() -> Vec<String> {
    let ci = read(".ci/run");
    let line = ci
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("cargo build --release"))
        .expect(".ci/run has a `cargo build --release` line");
    line.split_whitespace().map(String::from).collect()
}

/// The value after each `-p` in `words`.
fn packages(words: &[String]) -> Vec<String> {
    words
        .windows(2)
        .filter(|w| w[0] == "-p" || w[0] == "--package")
        .map(|w| w[1].clone())
        .collect()
}

/// Words of `words` that select features.
fn feature_flags(words: &[String]) -> Vec<String> {
    words
        .iter()
        .filter(|w| w.starts_with("--features") || *w == "-F" || w.ends_with("-features"))
        .cloned()
        .collect()
}

struct Image {
    dockerfile: &'static str,
    package: &'static str,
    binary: &'static str,
    /// The image name and tag the chart or the examples deploy.
    deployed_as: String,
}

fn images() -> Vec<Image> {
    let chart = read("charts/ferrymq-operator/Chart.yaml");
    let app_version = chart
        .lines()
        .find_map(|l| l.strip_prefix("appVersion:"))
        .map(|v| v.trim().trim_matches('"').to_string())
        .expect("Chart.yaml appVersion");
    let values = read("charts/ferrymq-operator/values.yaml");
    let repository = values
        .lines()
        .find_map(|l| l.trim().strip_prefix("repository:"))
        .map(|v| v.trim().to_string())
        .expect("values.yaml image.repository");
    let example = read("docs/examples/mqttbroker-kafka-postgres.yaml");
    let broker_image = example
        .lines()
        .find_map(|l| l.trim().strip_prefix("image:"))
        .map(|v| v.trim().to_string())
        .expect("the example MqttBroker's spec.image");
    vec![
        Image {
            dockerfile: "docker/Dockerfile.broker",
            package: "ferrymq-broker",
            binary: "ferrymq",
            deployed_as: broker_image,
        },
        Image {
            dockerfile: "docker/Dockerfile.operator",
            package: "ferrymq-operator",
            binary: "ferrymq-operator",
            deployed_as: format!("{repository}:{app_version}"),
        },
    ]
}

#[test]
fn dockerfiles_build_like_ci_and_run_the_binary_as_non_root() {
    let ci = ci_release_build();
    let workspace = read("Cargo.toml");
    for image in images() {
        let text = read(image.dockerfile);
        let steps = instructions(&text);
        let froms: Vec<&String> = steps.iter().filter(|s| s.starts_with("FROM ")).collect();
        assert_eq!(
            froms.len(),
            2,
            "{}: a build and a runtime stage",
            image.dockerfile
        );

        // The build: CI's command (`cargo build --release`, --locked as `.ci/run`'s fetch
        // phase enforces), for this package only, with CI's feature flags (none today: every
        // package's default features). CI's release build covers the broker; the operator's
        // binary is built by CI's test phase (kube_operator runs it), in debug.
        let build = steps
            .iter()
            .find(|s| s.starts_with("RUN ") && s.contains("cargo build"))
            .unwrap_or_else(|| panic!("{}: no cargo build", image.dockerfile));
        let cargo: Vec<String> = build
            .split("&&")
            .find(|part| part.contains("cargo build"))
            .expect("the cargo part")
            .trim_start_matches("RUN ")
            .split_whitespace()
            .map(String::from)
            .collect();
        assert_eq!(&cargo[..3], &ci[..3], "{}: {cargo:?}", image.dockerfile);
        assert!(
            cargo.contains(&"--locked".to_string()),
            "{}",
            image.dockerfile
        );
        assert_eq!(packages(&cargo), [image.package], "{}", image.dockerfile);
        assert_eq!(
            feature_flags(&cargo),
            feature_flags(&ci),
            "{}",
            image.dockerfile
        );
        assert!(
            build.contains(&format!("target/release/{} ", image.binary)),
            "{}: copies target/release/{}",
            image.dockerfile,
            image.binary
        );

        // What the build stage copies must exist: the whole tree, so every workspace member and
        // Cargo.lock are there; .dockerignore must not drop any of them.
        let ignored = read(".dockerignore");
        let members = workspace
            .lines()
            .find_map(|l| l.trim().strip_prefix("members = "))
            .expect("workspace members");
        for member in members.trim_matches(['[', ']']).split(',') {
            let member = member.trim().trim_matches('"');
            assert!(
                repo().join(member).join("Cargo.toml").is_file(),
                "workspace member {member}"
            );
            assert!(
                !ignored
                    .lines()
                    .any(|l| l.trim().trim_matches('/') == member),
                ".dockerignore drops the workspace member {member}"
            );
        }
        for step in steps
            .iter()
            .filter(|s| s.starts_with("COPY ") && !s.contains("--from="))
        {
            let words: Vec<&str> = step.split_whitespace().collect();
            for source in &words[1..words.len() - 1] {
                assert!(
                    repo().join(source).exists(),
                    "{}: COPY {source}",
                    image.dockerfile
                );
            }
        }

        // The runtime stage: the binary from the build stage, CA certificates, non-root.
        let runtime = runtime_stage(&steps);
        let copies: Vec<&String> = runtime.iter().filter(|s| s.starts_with("COPY ")).collect();
        assert_eq!(
            copies,
            [&format!(
                "COPY --from=build /{} /usr/local/bin/{}",
                image.binary, image.binary
            )],
            "{}: the runtime stage holds the binary only",
            image.dockerfile
        );
        assert!(
            runtime.iter().any(|s| s.contains("ca-certificates")),
            "{}: CA certificates",
            image.dockerfile
        );
        let user = runtime
            .iter()
            .filter_map(|s| s.strip_prefix("USER "))
            .next_back()
            .unwrap_or_else(|| panic!("{}: no USER", image.dockerfile));
        let uid: u32 = user
            .split(':')
            .next()
            .and_then(|u| u.parse().ok())
            .unwrap_or_else(|| panic!("{}: USER {user} is not numeric", image.dockerfile));
        // Numeric, so the kubelet can check runAsNonRoot without an /etc/passwd lookup.
        assert_ne!(uid, 0, "{}: runs as root", image.dockerfile);
        assert_eq!(
            runtime.last().map(String::as_str),
            Some(format!("ENTRYPOINT [\"/usr/local/bin/{}\"]", image.binary).as_str()),
            "{}",
            image.dockerfile
        );

        // Tagged as deployed: the header's `docker build ... -t NAME` is the chart's default
        // image (operator) or the examples' broker image.
        assert!(
            text.contains(&format!("-t {} ", image.deployed_as)),
            "{}: the build command in its header does not tag {}",
            image.dockerfile,
            image.deployed_as
        );
        let operator_doc = read("docs/operator.md");
        assert!(
            operator_doc.contains(&format!("-f {}", image.dockerfile))
                && operator_doc.contains(&image.deployed_as),
            "docs/operator.md shows how to build {} as {}",
            image.dockerfile,
            image.deployed_as
        );
    }
}

/// `cargo metadata`'s resolved graph: package id → (name, normal dependency ids).
fn resolved_graph() -> (HashMap<String, String>, HashMap<String, Vec<String>>) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--locked", "--offline"])
        .current_dir(repo())
        .output()
        .expect("running cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metadata JSON");
    let names = meta["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .map(|p| {
            (
                p["id"].as_str().expect("id").to_string(),
                p["name"].as_str().expect("name").to_string(),
            )
        })
        .collect();
    let deps = meta["resolve"]["nodes"]
        .as_array()
        .expect("resolve.nodes")
        .iter()
        .map(|n| {
            let normal = n["deps"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|d| {
                    d["dep_kinds"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|k| k["kind"].is_null())
                })
                .map(|d| d["pkg"].as_str().expect("pkg").to_string())
                .collect();
            (n["id"].as_str().expect("id").to_string(), normal)
        })
        .collect();
    (names, deps)
}

/// The names of every package `root` depends on, normal dependencies only (not dev, not build).
fn normal_closure(root: &str) -> BTreeSet<String> {
    let (names, deps) = resolved_graph();
    let start = names
        .iter()
        .find(|(_, n)| n.as_str() == root)
        .map(|(id, _)| id.clone())
        .unwrap_or_else(|| panic!("no package {root}"));
    let mut seen = BTreeSet::new();
    let mut todo = vec![start];
    while let Some(id) = todo.pop() {
        if !seen.insert(id.clone()) {
            continue;
        }
        todo.extend(deps.get(&id).cloned().unwrap_or_default());
    }
    seen.iter()
        .filter_map(|id| names.get(id).cloned())
        .collect()
}

#[test]
fn the_operator_image_does_not_carry_the_broker() {
    let operator = normal_closure("ferrymq-operator");
    assert!(
        operator.contains("ferrymq-common"),
        "the operator shares the broker's rules through ferrymq-common"
    );
    for heavy in [
        "ferrymq-broker",
        "redb",
        "tokio-tungstenite",
        "jsonwebtoken",
        "x509-parser",
    ] {
        assert!(
            !operator.contains(heavy),
            "ferrymq-operator depends on {heavy} (through {:?})",
            operator
        );
    }
    // And the broker still shares them: one definition of each rule.
    assert!(normal_closure("ferrymq-broker").contains("ferrymq-common"));
}

/// The Debian bookworm package of each shared library a ferrymq binary may link; the C runtime
/// (libc, libm, libgcc_s, the loader) is in every Debian image, `debian:bookworm-slim` included.
const PACKAGE_OF: &[(&str, &str)] = &[
    ("libcurl.so.4", "libcurl4"),
    ("libssl.so.3", "libssl3"),
    ("libcrypto.so.3", "libssl3"),
    ("libc.so.6", ""),
    ("libm.so.6", ""),
    ("libgcc_s.so.1", ""),
    ("ld-linux-x86-64.so.2", ""),
];

/// The runtime stage's `apt-get install` packages.
fn runtime_packages(dockerfile: &str) -> BTreeSet<String> {
    let steps = instructions(&read(dockerfile));
    runtime_stage(&steps)
        .iter()
        .filter(|s| s.contains("apt-get install"))
        .flat_map(|s| {
            s.split("&&")
                .filter(|part| part.contains("apt-get install"))
                .flat_map(|part| {
                    part.split_whitespace()
                        .skip_while(|w| *w != "install")
                        .skip(1)
                        .filter(|w| !w.starts_with('-'))
                        .map(String::from)
                        .collect::<Vec<_>>()
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The operator binary's direct shared libraries (its ELF NEEDED entries, through `readelf`)
/// are installed by the runtime stage, which installs nothing else but CA certificates: a new system library
/// fails here instead of in a pod (`error while loading shared libraries`). The debug build
/// cargo made for this test links the same libraries as the release build in the image (the
/// same rdkafka features). The broker links the same librdkafka build and its Dockerfile
/// installs the same packages, checked by the comparison below.
#[test]
fn runtime_stages_install_the_shared_libraries_the_binaries_link() {
    let out = Command::new("readelf")
        .args(["-d", env!("CARGO_BIN_EXE_ferrymq-operator")])
        .output()
        .expect("running readelf (binutils)");
    assert!(out.status.success(), "readelf failed");
    let needed: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(|l| Some(l.split('[').nth(1)?.trim_end_matches(']').to_string()))
        .collect();
    assert!(
        !needed.is_empty(),
        "no NEEDED entries: not a dynamic executable?"
    );
    let mut wanted: BTreeSet<String> = BTreeSet::from(["ca-certificates".to_string()]);
    for lib in &needed {
        let package = PACKAGE_OF
            .iter()
            .find(|(soname, _)| soname == lib)
            .map(|(_, package)| *package)
            .unwrap_or_else(|| {
                panic!("the operator links {lib}: add its Debian package to PACKAGE_OF and the Dockerfiles")
            });
        if !package.is_empty() {
            wanted.insert(package.to_string());
        }
    }
    let operator = runtime_packages("docker/Dockerfile.operator");
    // At least what this build links. Not exactly: whether librdkafka's cmake build links
    // libcurl depends on what the build machine had when rdkafka-sys was first built (CI's
    // cached target linked only libssl; a fresh one links libcurl too), so the image installs
    // the union, and nothing outside the known list.
    assert!(
        wanted.is_subset(&operator),
        "docker/Dockerfile.operator installs {operator:?}, the binary needs {wanted:?}"
    );
    let known: BTreeSet<String> = PACKAGE_OF
        .iter()
        .map(|(_, package)| package.to_string())
        .filter(|p| !p.is_empty())
        .chain(["ca-certificates".to_string()])
        .collect();
    assert!(
        operator.is_subset(&known),
        "docker/Dockerfile.operator installs packages no linked library needs: {:?}",
        operator.difference(&known).collect::<Vec<_>>()
    );
    assert_eq!(
        runtime_packages("docker/Dockerfile.broker"),
        operator,
        "the broker links the same librdkafka build as the operator"
    );
}

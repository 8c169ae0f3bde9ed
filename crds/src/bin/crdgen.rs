//! Writes the CRDs as YAML: `crdgen [DIR]` writes `DIR/mqttbroker.yaml` and
//! `DIR/applicationclient.yaml` (DIR defaults to `crds`); `crdgen -` prints them to stdout as one
//! multi-document stream (for `kubectl apply -f -`).

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let docs = ferrymq_crds::crd_documents()?;
    let target = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "crds".to_string());
    if target == "-" {
        for (_, yaml) in &docs {
            print!("---\n{yaml}");
        }
        return Ok(());
    }
    let dir = PathBuf::from(target);
    std::fs::create_dir_all(&dir)?;
    for (file, yaml) in docs {
        let path = dir.join(file);
        std::fs::write(&path, yaml)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

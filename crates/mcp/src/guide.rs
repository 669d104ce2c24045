//! `get_guide`: short texts an agent reads to use the tools well.

pub const SECTIONS: [&str; 7] = ["quickstart", "workflow", "state", "async", "tagging", "errors", "reference"];

pub const INSTRUCTIONS: &str = "Boxwood runs commands in fresh microVMs started from immutable images. \
Use `run` (image by UUID or `tag:NAME`; `list_images` shows them). Runs are disposable by default; \
pass disposable=false to keep the changes as a new image (`result_image`). Put local files in a run \
with `upload` + `files`. Inspect images without a VM: `list_files`, `read_file`, `grep`, `download`. \
`get_guide` explains more.";

pub fn section(name: &str) -> Option<&'static str> {
    Some(match name {
        "quickstart" => {
            "\
1. list_images {\"tagged\": true} — pick an image, e.g. tag:python:3.11.
2. run {\"command\": \"python --version\", \"image\": \"tag:python:3.11\"} — exit_code, stdout, stderr.
3. run {\"command\": \"pip install flask\", \"image\": \"tag:python:3.11\", \"disposable\": false, \"timeout\": 300}
   — result_image is a new image with flask; the source image is unchanged.
4. run {\"command\": \"python -c 'import flask'\", \"image\": \"<result_image>\"}."
        }
        "workflow" => {
            "\
Build up an environment step by step: each run with disposable=false returns result_image; run the
next step on it. filesystem_changed=false means the run changed nothing (result_image is the source).
Bring code in with upload (path or content) and files {\"/app/main.py\": \"<upload uuid>\"}; one
upload may go to several paths. Set cwd for the working directory (created if missing; without it
the image's saved one, else /root)."
        }
        "state" => {
            "\
Images are immutable. A run never changes its image: disposable runs throw their changes away;
persisted runs (disposable=false) save them as a new image whose parent is the source. image_lineage
shows an image's parents and children (kept by the server). Environment variables persist only with
preserve_env=true."
        }
        "async" => {
            "\
run {..., \"wait\": false} returns {\"operation_id\"} at once. wait_operations {\"operation_ids\": [...]}
waits for them (mode \"any\": the first, cancelling the rest); get_operation shows one;
cancel_operation stops one; exec runs another command inside a running operation's VM."
        }
        "tagging" => {
            "\
set_tag {\"image_uuid\": \"<uuid>\", \"tag\": \"my-env:v1\"} names an image; then use image
\"tag:my-env:v1\". Moving a tag to another image is allowed; set_tag without tag removes the tags."
        }
        "errors" => {
            "\
- \"no image …\": the image is not known to this token's namespace; list_images shows what is.
- timed_out=true: the command ran past timeout (default 30 s); raise timeout.
- exit_code != 0 with status SUCCESS: the command failed, the sandbox worked; read stderr.
- status FAILED: the operation itself failed (error says why), e.g. a layer past max_layer_bytes.
- files: the key is the path in the VM, the value the upload's UUID."
        }
        "reference" => {
            "\
run: command, image, shell=true, env, preserve_env=false, cwd, uid=0, gid=0, timeout=30,
     disposable=true, stdin, files {path: upload uuid}, wait=true, truncate_output_at=8000,
     max_layer_bytes. Returns uuid, status, exit_code, timed_out, stdout, stderr (null when
     empty), result_image, filesystem_changed, image_uuid, result_image_uuid, duration.
upload: path | content | content_base64 → {uuid, sha256, size}.
list_images, get_image, image_lineage, import_image, set_tag, download, list_files, read_file, grep,
get_operation, list_operations, wait_operations, cancel_operation, exec, whoami, get_guide."
        }
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_listed_section_exists() {
        for s in super::SECTIONS {
            assert!(super::section(s).is_some(), "{s}");
        }
        assert!(super::section("nope").is_none());
    }
}

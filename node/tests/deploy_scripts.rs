//! The install step of the README's commands (`deploy/env.sh`), against fake system layouts:
//! a fresh machine of this kind ships `libclang-cpp` (the C++ library) but not libclang (the C
//! library bindgen loads), and the detection must tell them apart.

use std::path::Path;
use std::process::Command;

/// Runs `script` in bash after sourcing deploy/env.sh with `FLOTILLA_SYSTEM_ROOT=root`.
fn env_sh(root: &Path, script: &str) -> (bool, String) {
    let env_sh = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/env.sh");
    let output = Command::new("bash")
        .arg("-c")
        .arg(format!(". {}; {script}", env_sh.display()))
        .env("FLOTILLA_SYSTEM_ROOT", root)
        .output()
        .expect("bash");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).trim().to_string(),
    )
}

fn touch(root: &Path, path: &str) {
    let file = root.join(path);
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::write(file, b"").unwrap();
}

#[test]
fn libclang_cpp_alone_is_not_libclang() {
    let root = tempfile::tempdir().unwrap();
    // What a fresh machine of this kind has (libclang-cpp14).
    touch(root.path(), "usr/lib/llvm-14/lib/libclang-cpp.so.14");
    touch(root.path(), "usr/lib/x86_64-linux-gnu/libclang-cpp.so.14");
    touch(root.path(), "usr/lib/llvm-14/lib/libLLVM-14.so.1");
    assert!(!env_sh(root.path(), "flotilla_has_libclang").0);
    assert!(!env_sh(root.path(), "flotilla_has_clang_headers").0);
    let (_, missing) = env_sh(root.path(), "flotilla_missing_packages");
    let missing: Vec<&str> = missing.split_whitespace().collect();
    assert!(missing.contains(&"libclang1-14"), "{missing:?}");
    assert!(missing.contains(&"libclang-common-14-dev"), "{missing:?}");
}

#[test]
fn libclang_and_its_headers_are_found_where_debian_installs_them() {
    for library in [
        "usr/lib/llvm-14/lib/libclang-14.so.1",
        "usr/lib/llvm-14/lib/libclang.so.1",
        "usr/lib/x86_64-linux-gnu/libclang-14.so.1",
    ] {
        let root = tempfile::tempdir().unwrap();
        touch(root.path(), "usr/lib/llvm-14/lib/libclang-cpp.so.14");
        touch(root.path(), library);
        touch(
            root.path(),
            "usr/lib/llvm-14/lib/clang/14.0.6/include/stdbool.h",
        );
        assert!(env_sh(root.path(), "flotilla_has_libclang").0, "{library}");
        assert!(env_sh(root.path(), "flotilla_has_clang_headers").0);
        let (_, missing) = env_sh(root.path(), "flotilla_missing_packages");
        assert!(!missing.contains("libclang"), "{library}: {missing}");
    }
}

#[test]
fn headers_without_the_library_still_ask_for_the_library() {
    let root = tempfile::tempdir().unwrap();
    touch(
        root.path(),
        "usr/lib/llvm-14/lib/clang/14.0.6/include/stdbool.h",
    );
    let (_, missing) = env_sh(root.path(), "flotilla_missing_packages");
    let missing: Vec<&str> = missing.split_whitespace().collect();
    assert!(missing.contains(&"libclang1-14"), "{missing:?}");
    assert!(!missing.contains(&"libclang-common-14-dev"), "{missing:?}");
}

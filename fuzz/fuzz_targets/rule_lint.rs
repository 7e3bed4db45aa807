//! `faastastic rules check`: the Prometheus rule-file linter (`rules::check_file`) on any text.
//! No panic (YAML parsing, PromQL parsing, the walk over the expression); every finding names
//! the file and a line of it, with a message.

#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use faastastic::cli::rules::check_file;
use libfuzzer_sys::fuzz_target;

/// The linter reads a file: one scratch file per fuzzing process, rewritten for every input.
fn scratch() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("target")
            .join("scratch");
        std::fs::create_dir_all(&dir).expect("scratch directory");
        dir.join(format!("rules-{}.yml", std::process::id()))
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = scratch();
    std::fs::write(path, text).expect("write the rule file");
    let findings = check_file(path);
    let file = path.display().to_string();
    // A YAML error's line is counted as YAML counts lines (CR, LF, NEL, LS and PS all break
    // one), which can be more lines than `str::lines` sees; at the end of a file without a
    // final line break the parser reports the line after the last one.
    let lines = text
        .chars()
        .filter(|c| matches!(c, '\n' | '\r' | '\u{85}' | '\u{2028}' | '\u{2029}'))
        .count();
    for f in &findings {
        assert_eq!(f.file, file);
        assert!(
            f.line >= 1 && f.line <= lines + 2,
            "line {} of {lines}: {f}",
            f.line
        );
        assert!(!f.message.trim().is_empty());
        let _ = f.to_string();
    }
});

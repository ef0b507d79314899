//! Standard output that a closed pipe ends quietly (`nubo ps | head -1`): the program exits
//! with the status a process killed by SIGPIPE has, instead of panicking.

use std::io::Write;

/// Exit status of a program whose output pipe closed (128 + SIGPIPE).
const BROKEN_PIPE_STATUS: i32 = 141;

/// Writes `args` to standard output; exits quietly if the reader is gone.
pub fn write(args: std::fmt::Arguments<'_>) {
    emit(|out| out.write_fmt(args));
}

/// Writes raw bytes to standard output; exits quietly if the reader is gone.
pub fn write_bytes(bytes: &[u8]) {
    emit(|out| out.write_all(bytes));
}

fn emit(write: impl FnOnce(&mut std::io::StdoutLock<'static>) -> std::io::Result<()>) {
    let mut stdout = std::io::stdout().lock();
    if let Err(error) = write(&mut stdout).and_then(|()| stdout.flush()) {
        if error.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(BROKEN_PIPE_STATUS);
        }
        eprintln!("error: cannot write to standard output: {error}");
        std::process::exit(1);
    }
}

/// Text from outside (a service's key, a node's attribute) with control characters shown as
/// `?`, so that it cannot move the cursor or recolour an operator's terminal.
pub fn clean(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() && c != '\n' { '?' } else { c })
        .collect()
}

/// A service's output with control characters but newlines and tabs shown as `?` (its
/// text must not drive the operator's terminal either).
pub fn clean_keeping_tabs(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() && c != '\n' && c != '\t' {
                '?'
            } else {
                c
            }
        })
        .collect()
}

/// `print!` to standard output, ending quietly on a closed pipe.
macro_rules! out {
    ($($arg:tt)*) => { $crate::output::write(format_args!($($arg)*)) };
}

/// `println!` to standard output, ending quietly on a closed pipe.
macro_rules! outln {
    () => { $crate::output::write(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::output::write(format_args!("{}\n", format_args!($($arg)*))) };
}

#[cfg(test)]
mod tests {
    #[test]
    fn control_characters_are_shown_harmless() {
        assert_eq!(super::clean("web/\u{1b}[31mred"), "web/?[31mred");
        assert_eq!(super::clean("plain"), "plain");
    }
}

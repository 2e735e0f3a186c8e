// Design notes
// - One interpreter per process, initialised once under a lock: two threads
//   racing PythonEngine.Initialize crash the process (pythonnet #1438).
// - After Initialize the calling thread holds the GIL; BeginAllowThreads
//   releases it, or every Python background thread (the worker's device and
//   postprocessing threads) stalls for good (pythonnet #964, #2074).
// - Every Python touch happens inside `using (Gil.Hold())`, and every PyObject
//   and PyBuffer is disposed inside it too (pythonnet #2544, #1493).
// - Shutdown hangs while Python threads live (#1500, #1701), and on Mono it
//   aborted in GC.Collect (sgen-scan-object.h:91) when PyObjects were still
//   live or queued for the .NET finalizer. `Dispose` is the safe sequence,
//   whatever a caller leaked:
//     1. the workers' close(timeout): intake stops, their Python threads join;
//     2. every handle this library gave out (output views, input buffers,
//        boards, log pumps) is disposed under the GIL;
//     3. new calls through this library answer `unavailable`, and calls under
//        way are waited for, so no library thread is inside Python;
//     4. .NET's finalizers are drained while the interpreter is whole, and
//        pythonnet releases what they queued (TryCollectingGarbage);
//     5. PythonEngine.Shutdown().
//   Hosts that use pythonnet directly: the same order (README, "Shutting
//   down"); above all, dispose or drop your own PyObjects before step 4 and
//   stop your own threads that call into Python.
// - The virtual environment is found from an explicit path, the
//   EMBEDDED_WORKER_VENV variable, or a `.venv/pyvenv.cfg` above the working
//   folder. Its own python reports libpython and its module path, so this
//   host needs no knowledge of how Python was installed.
using System;
using System.Collections.Generic;
using System.Diagnostics;
using System.IO;
using System.Threading;
using Python.Runtime;

namespace EmbeddedWorker
{
    public sealed class PythonRuntime : IDisposable
    {
        static readonly object Gate = new object();
        static PythonRuntime current;

        readonly IntPtr threadState;
        readonly List<Action> beforeShutdown = new List<Action>();
        readonly List<WeakReference> handedOut = new List<WeakReference>();  // guarded by itself
        readonly ManualResetEventSlim idle = new ManualResetEventSlim(true);
        int inFlight;
        volatile bool closing;
        bool disposed;

        public string VenvPath { get; private set; }
        public string RepoRoot { get; private set; }
        public string PythonExecutable { get; private set; }
        public bool IsShutDown { get { return disposed || closing; } }
        /// <summary>Why the C API fast path is off (null when it is on).</summary>
        public string FastPathUnavailable { get { return PythonApi.Available ? null : PythonApi.Unavailable ?? "not bound"; } }

        PythonRuntime(string venv)
        {
            VenvPath = venv;
            RepoRoot = Path.GetDirectoryName(venv);
            PythonExecutable = Path.Combine(venv, "bin", "python");
            if (!File.Exists(PythonExecutable))
                PythonExecutable = Path.Combine(venv, "Scripts", "python.exe");
            var facts = AskInterpreter(PythonExecutable);
            Runtime.PythonDLL = facts["library"];
            PythonEngine.PythonHome = facts["home"];
            PythonEngine.Initialize();
            PythonApi.Bind(facts["library"]);  // the C API entry points of the hot path
            threadState = PythonEngine.BeginAllowThreads();
            using (Gil.Hold())
            using (var site = Py.Import("site"))
            using (var sys = Py.Import("sys"))
            using (var path = sys.GetAttr("path"))
            {
                // the venv's own search path, then its .pth files (editable installs register there)
                foreach (var entry in facts["path"].Split('\n'))
                {
                    if (entry.Length == 0) continue;
                    using (var item = new PyString(entry))
                    using (var found = path.InvokeMethod("__contains__", item))
                        if (!found.IsTrue()) path.InvokeMethod("append", item).Dispose();
                }
                using (var packages = new PyString(facts["site_packages"]))
                    site.InvokeMethod("addsitedir", packages).Dispose();
                using (var executable = new PyString(PythonExecutable))
                    sys.SetAttr("executable", executable);
            }
        }

        /// <summary>The process's one interpreter, started on first use.</summary>
        public static PythonRuntime Start(string venvPath)
        {
            lock (Gate)
            {
                if (current != null && !current.disposed) return current;
                current = new PythonRuntime(FindVenv(venvPath));
                return current;
            }
        }

        /// <summary>Run before PythonEngine.Shutdown, newest first (the worker's close goes here).</summary>
        public void OnShutdown(Action action)
        {
            lock (Gate) beforeShutdown.Add(action);
        }

        /// <summary>Count a library call into Python; false once shutdown has begun.</summary>
        internal bool Enter()
        {
            Interlocked.Increment(ref inFlight);
            if (!closing && !disposed)
            {
                idle.Reset();
                return true;
            }
            Exit();
            return false;
        }

        internal void Exit()
        {
            if (Interlocked.Decrement(ref inFlight) == 0) idle.Set();
        }

        /// <summary>A handle given to a caller (a view, a buffer, a board, a pump): disposed at shutdown if the caller did not.</summary>
        public void Track(IDisposable handle)
        {
            lock (handedOut)
            {
                if (handedOut.Count >= 256 && handedOut.Count % 256 == 0) handedOut.RemoveAll(w => !w.IsAlive);
                handedOut.Add(new WeakReference(handle));
            }
        }

        /// <summary>The safe shutdown (see the design notes): close, dispose what was handed out, drain, shut down.</summary>
        public void Dispose()
        {
            lock (Gate)
            {
                if (disposed) return;
                for (int i = beforeShutdown.Count - 1; i >= 0; i--)
                {
                    try { beforeShutdown[i](); }
                    catch (Exception error) { Console.Error.WriteLine("shutdown: a close action failed: " + error.Message); }
                }
                List<WeakReference> handles;
                lock (handedOut) handles = new List<WeakReference>(handedOut);
                foreach (var reference in handles)
                {
                    var handle = reference.Target as IDisposable;
                    if (handle == null) continue;
                    try { handle.Dispose(); }
                    catch (Exception error) { Console.Error.WriteLine("shutdown: a handle failed to dispose: " + error.Message); }
                }
                closing = true;
                if (!idle.Wait(TimeSpan.FromSeconds(30)))
                    Console.Error.WriteLine("shutdown: library calls still inside Python after 30 s; shutting down anyway");
                using (Gil.Hold())
                {
                    if (PythonApi.Available)
                    {
                        RequestWriter.Release();
                        ReplyReader.Release();
                    }
                }
                for (int round = 0; round < 3; round++)
                {
                    GC.Collect();
                    GC.WaitForPendingFinalizers();  // PyObjects callers dropped: queued for pythonnet to release
                }
                using (Gil.Hold()) Runtime.TryCollectingGarbage(3);  // released while the interpreter is whole
                disposed = true;
                PythonEngine.EndAllowThreads(threadState);
                PythonEngine.Shutdown();
            }
        }

        /// <summary>The explicit path or EMBEDDED_WORKER_VENV when given (and only then), else a .venv above us.</summary>
        public static string FindVenv(string explicitPath)
        {
            var named = !string.IsNullOrEmpty(explicitPath) ? explicitPath
                      : Environment.GetEnvironmentVariable("EMBEDDED_WORKER_VENV");
            var candidates = new List<string>();
            if (!string.IsNullOrEmpty(named)) candidates.Add(named);
            else
                foreach (var start in new[] { Directory.GetCurrentDirectory(), AppDomain.CurrentDomain.BaseDirectory })
                    for (var folder = new DirectoryInfo(start); folder != null; folder = folder.Parent)
                        candidates.Add(Path.Combine(folder.FullName, ".venv"));
            foreach (var candidate in candidates)
                if (File.Exists(Path.Combine(candidate, "pyvenv.cfg"))) return Path.GetFullPath(candidate);
            throw new InvalidOperationException(
                "no Python virtual environment found " + (named != null ? "at " + named : "above the working folder")
                + ": pass --venv, set EMBEDDED_WORKER_VENV, or run `make setup` to create .venv");
        }

        static Dictionary<string, string> AskInterpreter(string python)
        {
            const string script =
                "import os, site, sys, sysconfig\n" +
                "libdir = sysconfig.get_config_var('LIBDIR') or ''\n" +
                "name = sysconfig.get_config_var('LDLIBRARY') or ''\n" +
                "print('library=' + os.path.join(libdir, name))\n" +
                "print('home=' + sys.base_prefix)\n" +
                "print('site_packages=' + site.getsitepackages()[0])\n" +
                "print('path=' + '\\x1f'.join(p for p in sys.path if p))\n";
            var start = new ProcessStartInfo(python, "-")
            {
                RedirectStandardInput = true,
                RedirectStandardOutput = true,
                RedirectStandardError = true,
                UseShellExecute = false,
            };
            using (var process = Process.Start(start))
            {
                process.StandardInput.Write(script);
                process.StandardInput.Close();
                var output = process.StandardOutput.ReadToEnd();
                process.WaitForExit();
                if (process.ExitCode != 0)
                    throw new InvalidOperationException(python + " failed: " + process.StandardError.ReadToEnd());
                var facts = new Dictionary<string, string>();
                foreach (var line in output.Split('\n'))
                {
                    var cut = line.IndexOf('=');
                    if (cut > 0) facts[line.Substring(0, cut)] = line.Substring(cut + 1).TrimEnd('\r');
                }
                facts["path"] = facts["path"].Replace('\x1f', '\n');
                return facts;
            }
        }
    }
}

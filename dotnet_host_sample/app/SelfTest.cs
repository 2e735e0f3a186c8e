// `--selftest [pytest arguments]`: the project's pytest suite inside this
// embedded interpreter, the way pythonnet tests itself. What passes under
// plain pytest must pass here too, where the GIL, threads and imports are
// the host's. Arguments that name test files or folders run those instead
// of the whole suite.
using System;
using System.Collections.Generic;
using System.IO;
using Python.Runtime;
using EmbeddedWorker;

namespace EmbeddedWorkerHost
{
    public static class SelfTest
    {
        public static int Run(PythonRuntime runtime, string[] pytestArguments)
        {
            var arguments = new List<object> { "-q", "-p", "no:cacheprovider", "-m", "not soak and not dotnet and not own_processes" };
            if (!Array.Exists(pytestArguments, NamesTests)) arguments.Add(Path.Combine(runtime.RepoRoot, "tests"));
            arguments.AddRange(pytestArguments);
            Environment.CurrentDirectory = runtime.RepoRoot;
            using (Py.GIL())
            using (var pytest = Py.Import("pytest"))
            using (var pythonArguments = PyConvert.ToPython(arguments))
            using (var code = pytest.InvokeMethod("main", pythonArguments))
            {
                int result = code.As<int>();
                Console.WriteLine("selftest: pytest inside the embedded interpreter exited with " + result);
                return result;
            }
        }

        static bool NamesTests(string argument)
        {
            var path = argument.Split(new[] { "::" }, StringSplitOptions.None)[0];
            return !argument.StartsWith("-") && (File.Exists(path) || Directory.Exists(path));
        }
    }
}

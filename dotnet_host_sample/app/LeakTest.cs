// The leak-then-shutdown test host: `--leak-test`. It does what ordinary
// code does wrong, from several threads at once, then shuts down through
// PythonRuntime and must exit 0 every time.
//
// Raw pythonnet threads (a client that bypasses the library): requests as
// nested dicts with None values, replies read through `.get` and GetItem and
// never disposed, a workflow's parameters listed item by item, an output read
// through GetBuffer and never released, malformed JSON and invalid ids sent
// through execute, pause and resume from another thread. Library users that
// forget to dispose: an output view, an input buffer, a board and a log pump
// left open. Nothing is cleaned up by hand before runtime.Dispose().
using System;
using System.Collections.Generic;
using System.Threading;
using EmbeddedWorker;
using Python.Runtime;

namespace EmbeddedWorkerHost
{
    public static class LeakTest
    {
        public static int Run(PythonRuntime runtime, int threads)
        {
            var library = new EmbeddedProcessingWorker(runtime);
            var done = library.ExecuteWorkflow(new { session_id = "leak-probe", workflow_id = "img-generation-basic",
                                                     parameters = new { steps = 4, seed = 2 }, background = false });
            if (done.Text("status") != "completed") { Console.WriteLine("probe failed: " + done); return 1; }
            Reply error;
            var outputId = ((Reply)done.List("outputs")[0]).Text("output_id");
            library.GetOutput(outputId, out error);           // a view never disposed
            library.AllocateInput(16, 16, out error);         // an input never disposed
            library.OpenBoard();                              // a board never disposed
            new LogPump(library, record => { }, TimeSpan.FromMilliseconds(50));  // a pump never stopped

            PyObject raw;
            using (Py.GIL())
            using (var module = Py.Import("embedded_worker"))
                raw = module.GetAttr("ProcessingWorker").Invoke();  // the raw client's own worker: closed, never disposed
            var failures = 0;
            var workers = new List<Thread>();
            for (int t = 0; t < threads; t++)
            {
                int index = t;
                var thread = new Thread(() =>
                {
                    try { Leak(raw, index); }
                    catch (Exception problem)
                    {
                        Console.WriteLine("thread " + index + ": " + problem.GetType().Name + ": " + problem.Message);
                        Interlocked.Increment(ref failures);
                    }
                }) { Name = "leaker-" + t };
                workers.Add(thread);
                thread.Start();
            }
            var controller = new Thread(() => PauseResume(raw));  // control from yet another thread
            controller.Start();
            foreach (var thread in workers) thread.Join();
            controller.Join();
            using (Py.GIL()) raw.InvokeMethod("close").Dispose();  // `raw` itself is left to the finalizer
            Console.WriteLine("leak test: " + threads + " threads leaked their objects, " + failures + " failed; shutting down");
            return failures == 0 ? 0 : 1;  // Program's finally: runtime.Dispose(), the path under test
        }

        static void Leak(PyObject worker, int index)
        {
            dynamic w = worker;
            for (int round = 0; round < 5; round++)
            {
                string id = "leak-" + index + "-" + round;
                using (Py.GIL())
                {
                    var parameters = new PyDict();
                    parameters["seed"] = new PyInt(index * 10 + round);
                    parameters["steps"] = new PyInt(3);
                    parameters["negative_prompt"] = PyObject.None;
                    var request = new PyDict();
                    request["session_id"] = new PyString(id);
                    request["workflow_id"] = new PyString("img-generation-basic");
                    request["parameters"] = parameters;
                    request["background"] = false.ToPython();
                    dynamic reply = worker.InvokeMethod("execute", new PyString("processing.execute_workflow"), request);
                    dynamic status = reply.get("status");           // through .get: never disposed
                    var outputs = ((PyObject)reply).GetItem("outputs");  // through GetItem: never disposed
                    if ((string)status == "completed")
                    {
                        var first = outputs.GetItem(0);
                        var pixels = w.get_output(first.GetItem("output_id"));
                        var buffer = ((PyObject)pixels).GetBuffer(PyBUF.C_CONTIGUOUS);  // never released
                        if (buffer.Length <= 0) throw new InvalidOperationException("empty output");
                    }
                    dynamic workflow = w.get_workflow(workflow_id: "img-generation-basic").get("workflow");
                    foreach (dynamic parameter in workflow["parameters"])  // item by item
                    {
                        string name = parameter["name"];
                        if (name == null) throw new InvalidOperationException("a parameter without a name");
                    }
                    worker.InvokeMethod("execute", new PyString("get_session_status"), new PyString("{not json"));
                    worker.InvokeMethod("execute", new PyString("get_session_status"),
                                        new PyString("{\"session_id\": \"\\u0000bad\"}"));
                    w.get_batch_status(new PyString("no-such-batch"));
                }
            }
        }

        static void PauseResume(PyObject worker)
        {
            dynamic w = worker;
            string id;
            using (Py.GIL())
            {
                var request = new PyDict();
                request["workflow_id"] = new PyString("img-generation-basic");
                var parameters = new PyDict();
                parameters["steps"] = new PyInt(60);
                request["parameters"] = parameters;
                id = (string)w.execute_workflow(request).get("session_id");
            }
            for (int i = 0; i < 5; i++)
            {
                Thread.Sleep(40);
                using (Py.GIL()) w.control_session(session_id: id, action: i % 2 == 0 ? "pause" : "resume");
            }
            using (Py.GIL()) w.control_session(session_id: id, action: "cancel");
        }
    }
}

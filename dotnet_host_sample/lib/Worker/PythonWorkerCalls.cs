// Design notes
// - The Python call stack of one worker: its PyObject, its bound methods
//   (looked up once), and the two ways to call them. The C API path
//   (Invoke) is the library's: one GIL hold through the thread's kept state
//   (ThreadStates), the request written and the reply read without a
//   PyObject. pythonnet's conversions (Guarded, SlowInvoke) remain where the
//   C API path cannot be had, and for calls that hand PyObjects on (outputs,
//   inputs, the board); they hold the GIL the same way (Gil.cs).
// - Nothing from Python may crash the host: failures are envelopes with a
//   typed code (WorkerErrors.cs) and, where Python raised through the
//   boundary, its traceback. After close, calls answer `unavailable`.
#pragma warning disable 612  // PyObject.Handle: read only while the object is alive, as the C API path needs
using System;
using System.Collections.Generic;
using Python.Runtime;

namespace EmbeddedWorker
{
    internal sealed class PythonWorkerCalls
    {
        readonly PythonRuntime runtime;
        readonly Action<Reply> onReply;
        readonly Dictionary<string, PyObject> methods = new Dictionary<string, PyObject>();  // guarded by the GIL
        PyObject worker;
        volatile bool closed;  // set under the GIL, so no call can use a released method

        /// <summary>With the GIL held; `onReply` sees every reply of Invoke.</summary>
        public PythonWorkerCalls(PythonRuntime runtime, PyObject worker, Action<Reply> onReply)
        {
            this.runtime = runtime;
            this.worker = worker;
            this.onReply = onReply;
        }

        public PyObject Worker { get { return worker; } }
        public bool Closed { get { return closed; } }

        /// <summary>Release the methods and the worker; later calls answer `unavailable`. Takes the GIL.</summary>
        public void Close()
        {
            using (Gil.Hold())
            {
                if (closed) return;
                closed = true;
                foreach (var method in methods.Values) method.Dispose();
                methods.Clear();
                worker.Dispose();
            }
        }

        /// <summary>A bound method of the Python worker, looked up once. With the GIL held.</summary>
        public PyObject Method(string name)
        {
            PyObject method;
            if (!methods.TryGetValue(name, out method)) methods[name] = method = worker.GetAttr(name);
            return method;
        }

        static readonly object[] NoArguments = new object[0];

        /// <summary>worker.method(): a command that takes nothing.</summary>
        public Reply Call(string method)
        {
            return CallMethod(method, NoArguments);
        }

        /// <summary>worker.method(argument).</summary>
        public Reply Call(string method, object argument)
        {
            return CallMethod(method, new[] { argument });
        }

        /// <summary>The bound method looked up (once, by name), then invoked.</summary>
        Reply CallMethod(string method, object[] arguments)
        {
            IntPtr handle = IntPtr.Zero;
            Reply refused;
            if (!Guarded(() => { if (!closed) handle = Method(method).Handle; }, out refused))
                return refused;
            return Invoke(handle, arguments);
        }

        /// <summary>method(*arguments) through the C API: one GIL hold, the reply read in one pass.</summary>
        public Reply Invoke(IntPtr method, object[] arguments)
        {
            if (!PythonApi.Available) return SlowInvoke(method, arguments);
            if (!runtime.Enter()) return Reply.Failure("unavailable", "the Python runtime is shut down");
            Reply reply;
            try
            {
                using (Gil.Hold())  // the thread's state kept between calls
                {
                    if (closed || method == IntPtr.Zero) return Reply.Failure("unavailable", "the worker is closed");
                    var tuple = PythonApi.NewTuple((IntPtr)arguments.Length);
                    for (int i = 0; i < arguments.Length; i++)
                    {
                        var item = RequestWriter.Write(arguments[i]);
                        if (item == IntPtr.Zero)
                        {
                            PythonApi.DecRef(tuple);
                            return Reply.Failure("invalid_request", "the request cannot be converted: " + PythonApi.TakeError());
                        }
                        PythonApi.TupleSet(tuple, (IntPtr)i, item);
                    }
                    var result = PythonApi.Call(method, tuple, IntPtr.Zero);
                    PythonApi.DecRef(tuple);
                    if (result == IntPtr.Zero)
                    {
                        string traceback;
                        var raised = PythonApi.TakeError(out traceback);
                        return Reply.Failure("internal", "Python raised: " + raised, traceback);
                    }
                    var value = ReplyReader.Read(result);
                    PythonApi.DecRef(result);
                    reply = value as Reply ?? Reply.Failure("internal", "the worker answered a " + (value == null ? "None" : value.GetType().Name) + ", not a dict");
                }
            }
            catch (Exception error)
            {
                return Reply.Failure("internal", error.GetType().Name + ": " + error.Message);
            }
            finally
            {
                runtime.Exit();
            }
            onReply(reply);
            return reply;
        }

        /// <summary>The same through pythonnet, where the C API path is unavailable.</summary>
        Reply SlowInvoke(IntPtr method, object[] arguments)
        {
            Reply reply = null;
            Reply refused;
            if (!Guarded(() =>
            {
                if (closed || method == IntPtr.Zero)
                {
                    reply = Reply.Failure("unavailable", "the worker is closed");
                    return;
                }
                PyObject callable = null;
                foreach (var known in methods.Values) if (known.Handle == method) callable = known;
                var converted = new List<PyObject>();
                try
                {
                    foreach (var argument in arguments) converted.Add(PyConvert.ToPython(argument));
                    using (var result = callable.Invoke(converted.ToArray())) reply = PyConvert.ToReply(result);
                }
                finally
                {
                    foreach (var argument in converted) argument.Dispose();
                }
            }, out refused)) return refused;
            onReply(reply);
            return reply;
        }

        /// <summary>Run `body` under the GIL; false, with a failure reply (code, message, Python traceback), instead of any exception.</summary>
        public bool Guarded(Action body, out Reply failure)
        {
            failure = null;
            if (!runtime.Enter())
            {
                failure = Reply.Failure("unavailable", "the Python runtime is shut down");
                return false;
            }
            try
            {
                using (Gil.Hold()) body();
                return true;
            }
            catch (PythonException error)
            {
                string traceback = null;
                using (Gil.Hold())  // its type, value and traceback are PyObjects: not left to the finalizer
                {
                    try { traceback = error.Traceback != null ? error.Format() : null; }
                    catch (Exception) { }  // the message is enough
                    if (error.Value != null) error.Value.Dispose();
                    if (error.Traceback != null) error.Traceback.Dispose();
                }
                failure = Reply.Failure("internal", "PythonException: " + error.Message, traceback);
                return false;
            }
            catch (Exception error)
            {
                failure = Reply.Failure("internal", error.GetType().Name + ": " + error.Message);
                return false;
            }
            finally
            {
                runtime.Exit();
            }
        }
    }
}

// The library's one way to hold the GIL: PyGILState_Ensure on a thread whose
// Python thread state is kept between holds (ThreadStates), given back by
// Dispose. Every library call, pixel release and setup step takes it here;
// pythonnet's Py.GIL() (the same Ensure, plus pythonnet's bookkeeping) is
// only the fallback where the C API could not be bound. Never across an
// await (pythonnet #1454).
using System;
using Python.Runtime;

namespace EmbeddedWorker
{
    internal struct Gil : IDisposable
    {
        readonly int state;
        readonly IDisposable fallback;

        Gil(int state, IDisposable fallback)
        {
            this.state = state;
            this.fallback = fallback;
        }

        /// <summary>Hold the GIL until Dispose; nested holds on one thread are fine.</summary>
        public static Gil Hold()
        {
            return PythonApi.Available ? new Gil(ThreadStates.Ensure(), null) : new Gil(0, Py.GIL());
        }

        public void Dispose()
        {
            if (fallback != null) fallback.Dispose();
            else PythonApi.GilRelease(state);
        }
    }
}
